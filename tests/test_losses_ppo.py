"""PPO losses (docs/vineppo.md / "PPO baseline") and masked reductions."""

from __future__ import annotations

import math

import pytest
import torch

from lit_reason.losses import (
    gae_advantages,
    masked_mean,
    masked_sum,
    ppo_policy_loss,
    terminal_rewards,
    value_loss,
)

TOL = dict(atol=1e-6, rtol=1e-6)


def ragged_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Right-padded float mask with row lengths in [1, length]."""
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    return (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).double()


# ----------------------------------------------------------------------------- masked reductions


def test_masked_mean_and_sum_by_hand():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    # valid: 1, 2, 4 -> sum 7, count 3; the nan/inf at masked positions must not leak
    assert masked_sum(x, mask).item() == pytest.approx(7.0)
    assert masked_mean(x, mask).item() == pytest.approx(7.0 / 3.0)
    # per row: (1+2)/2 = 1.5 ; 4/1 = 4
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(masked_sum(x, mask.float(), dim=1), torch.tensor([3.0, 4.0]))


def test_masked_mean_empty_is_zero():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([0.0, 3.5]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_mean_is_token_mean_not_mean_of_means():
    # row 0 has 1 valid token (10), row 1 has 3 (0, 0, 0): token mean 10/4 = 2.5, mean of means 5
    x = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)


def test_masked_mean_shape_mismatch_names_mask():
    with pytest.raises(ValueError, match="mask"):
        masked_mean(torch.zeros(2, 3), torch.ones(2, 4))


# ----------------------------------------------------------------------------- ppo_policy_loss


def _pg_example():
    # row 0: three valid tokens and one padding token holding garbage
    logp = torch.tensor([[-1.0, -0.5, -2.0, 5.0]], requires_grad=True)
    old = torch.tensor([[-0.9, -0.8, -1.5, -50.0]])
    adv = torch.tensor([[1.0, 2.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    return logp, old, adv, mask


def test_ppo_policy_loss_by_hand():
    logp, old, adv, mask = _pg_example()
    loss, m = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # token 0: rho = exp(-0.1) = 0.904837 (inside [0.8, 1.2]); A=1 -> term max(-0.904837, -0.904837) = -0.904837
    # token 1: rho = exp(0.3) = 1.349859 -> clipped 1.2; A=2 -> max(-2.699718, -2.4) = -2.4 (clipped active)
    # token 2: rho = exp(-0.5) = 0.606531 -> clipped 0.8; A=-1 -> max(0.606531, 0.8) = 0.8 (clipped active)
    # pg = (-0.904837 - 2.4 + 0.8) / 3 = -0.834946 ; padding ignored
    assert loss.item() == pytest.approx(-0.8349458, abs=1e-6)
    assert m["pg_loss"].item() == pytest.approx(-0.8349458, abs=1e-6)
    assert m["kl_loss"].item() == 0.0 and m["kl"].item() == 0.0
    assert m["clip_frac"].item() == pytest.approx(2.0 / 3.0)
    # ratio mean = (0.904837 + 1.349859 + 0.606531) / 3 = 0.953742
    assert m["ratio_mean"].item() == pytest.approx(0.9537423, abs=1e-6)
    # approx_kl_old = 0.5 * (0.1^2 + 0.3^2 + 0.5^2) / 3 = 0.5 * 0.35 / 3 = 0.058333
    assert m["approx_kl_old"].item() == pytest.approx(0.0583333, abs=1e-6)
    assert m["skipped"].item() == 0.0
    for v in m.values():
        assert v.dim() == 0 and not v.requires_grad


def test_ppo_policy_loss_gradient_zero_where_clipped():
    logp, old, adv, mask = _pg_example()
    loss, _ = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    loss.backward()
    # d/dlogp of -A*rho/3 at token 0 = -1 * 0.904837 / 3 = -0.301612; tokens 1, 2 are clipped in
    # the direction of their advantage -> 0; padding -> 0 (and finite despite exp(55))
    expected = torch.tensor([[-math.exp(-0.1) / 3.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected, **TOL)


def test_ppo_clip_does_not_cut_gradient_against_the_advantage():
    # rho = exp(0.3) = 1.35 > 1.2 but A < 0: -A*rho = 1.35 > -A*1.2 = 1.2 -> unclipped term wins,
    # gradient = -A * rho = 1.349859 (the pessimistic bound keeps the gradient)
    logp = torch.tensor([[-0.5]], requires_grad=True)
    loss, m = ppo_policy_loss(logp, torch.tensor([[-0.8]]), torch.tensor([[-1.0]]), torch.ones(1, 1))
    loss.backward()
    assert loss.item() == pytest.approx(math.exp(0.3), abs=1e-6)
    assert logp.grad.item() == pytest.approx(math.exp(0.3), abs=1e-6)
    assert m["clip_frac"].item() == 0.0


def _kl_example():
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-1.0, 0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.2, -0.5, -1.0], [-3.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    return logp, ref, mask


def test_ppo_kl_term_by_hand():
    logp, ref, mask = _kl_example()
    old = logp.detach().clone()
    adv = torch.zeros_like(old)  # pg term is 0
    loss, m = ppo_policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, kl_clip_max=10.0)
    # d = ref - logp ; k3 = e^d - d - 1
    # row 0: d = -0.2, 0, 1 -> k3 = 0.018731, 0, 0.718282 -> sum 0.737013
    # row 1: d = -2 -> k3 = 0.135335 + 2 - 1 = 1.135335 (padding with d=7 ignored)
    # L_kl = 0.1 * mean_seq(0.737013, 1.135335) = 0.1 * 0.936174 = 0.0936174
    assert loss.item() == pytest.approx(0.0936174, abs=1e-6)
    assert m["kl_loss"].item() == pytest.approx(0.0936174, abs=1e-6)
    # kl metric = mean k3 per valid token = 1.872348 / 4 = 0.468087
    assert m["kl"].item() == pytest.approx(0.468087, abs=1e-6)
    assert m["pg_loss"].item() == 0.0


def test_ppo_kl_clip_by_hand_and_gradient():
    logp, ref, mask = _kl_example()
    old = logp.detach().clone()
    loss, m = ppo_policy_loss(
        logp, old, torch.zeros_like(old), mask, ref_logprobs=ref, kl_coef=0.1, kl_clip_max=0.5
    )
    # per-token clip at 0.5: row 0 -> 0.018731 + 0 + 0.5 = 0.518731 ; row 1 -> 0.5
    # L_kl = 0.1 * (0.518731 + 0.5) / 2 = 0.0509365
    assert loss.item() == pytest.approx(0.0509365, abs=1e-6)
    loss.backward()
    # dk3/dlogp = 1 - e^d ; scaled by kl_coef / B = 0.05. token (0,0): 0.05 * (1 - e^-0.2) = 0.0090635
    # (0,1): d=0 -> 0 ; (0,2) and (1,0) are clipped at 0.5 -> 0 ; padding -> 0
    expected = torch.tensor([[0.05 * (1 - math.exp(-0.2)), 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected, **TOL)


def test_ppo_ratio_threshold_skips_with_zero_gradient():
    logp, old, adv, mask = _pg_example()
    # ratio mean 0.953742 > 0.9 -> skipped
    loss, m = ppo_policy_loss(logp, old, adv, mask, ratio_threshold=0.9)
    assert m["skipped"].item() == 1.0
    assert loss.item() == 0.0
    assert m["pg_loss"].item() == pytest.approx(-0.8349458, abs=1e-6)  # still reported
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.zeros_like(logp))
    # and not skipped at threshold 1.0
    _, m2 = ppo_policy_loss(logp, old, adv, mask, ratio_threshold=1.0)
    assert m2["skipped"].item() == 0.0


def test_ppo_skip_with_overflowing_ratio_gives_finite_zero_grad():
    logp = torch.tensor([[100.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-100.0, -1.0]])  # rho = exp(200) = inf in float32
    ref = torch.tensor([[-1.0, -1.0]])
    loss, m = ppo_policy_loss(
        logp, old, torch.ones(1, 2), torch.ones(1, 2), ref_logprobs=ref, kl_coef=1e-4, ratio_threshold=10.0
    )
    assert m["skipped"].item() == 1.0 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def _naive_ppo(logp, old, adv, mask, ref, eps, kl_coef, kl_clip_max):
    """Python-loop reference of docs/vineppo.md on float64 tensors (keeps the graph)."""
    batch, length = logp.shape
    pg_terms, n = [], 0
    kl_rows = []
    ratios = []
    for b in range(batch):
        row_kl = logp.new_zeros(())
        for t in range(length):
            if mask[b, t] == 0:
                continue
            rho = torch.exp(logp[b, t] - old[b, t])
            ratios.append(rho)
            a = adv[b, t]
            pg_terms.append(torch.maximum(-a * rho, -a * torch.clamp(rho, 1 - eps, 1 + eps)))
            n += 1
            d = ref[b, t] - logp[b, t]
            k3 = torch.exp(d) - d - 1
            row_kl = row_kl + torch.clamp(k3, 0.0, kl_clip_max)
        kl_rows.append(row_kl)
    pg = sum(pg_terms) / n
    kl = kl_coef * sum(kl_rows) / batch
    return pg + kl, sum(ratios) / n


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ppo_policy_loss_matches_naive_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, length = 5, 7
    mask = ragged_mask(batch, length, gen)
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    logp_data = old + 0.4 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    ref = old + 0.8 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    adv = torch.randn(batch, length, generator=gen, dtype=torch.float64)

    logp = logp_data.clone().requires_grad_(True)
    loss, m = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, ref_logprobs=ref, kl_coef=0.3, kl_clip_max=0.7)
    loss.backward()

    logp_ref = logp_data.clone().requires_grad_(True)
    ref_loss, ref_ratio = _naive_ppo(logp_ref, old, adv, mask, ref, 0.2, 0.3, 0.7)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(logp.grad, logp_ref.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(m["ratio_mean"], ref_ratio.detach(), atol=1e-10, rtol=1e-10)


def test_ppo_policy_loss_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="old_logprobs"):
        ppo_policy_loss(x, torch.zeros(2, 4), x, x)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(x, x, torch.zeros(3, 3), x)
    with pytest.raises(ValueError, match="mask"):
        ppo_policy_loss(x, x, x, torch.ones(2))
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo_policy_loss(x, x, x, x, ref_logprobs=torch.zeros(1, 3), kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo_policy_loss(x, x, x, x, kl_coef=0.1)


# ----------------------------------------------------------------------------- terminal rewards


def test_terminal_rewards_by_hand():
    rewards = torch.tensor([1.0, 0.5, -1.0])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]])  # right, none, left+right padding
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5], [0.0, 0.0, -1.0, 0.0]])
    torch.testing.assert_close(terminal_rewards(rewards, mask), expected)


def test_terminal_rewards_bad_inputs():
    with pytest.raises(ValueError, match="rewards"):
        terminal_rewards(torch.ones(3), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        terminal_rewards(torch.ones(2), torch.tensor([[1, 0], [0, 0]]))


# ----------------------------------------------------------------------------- GAE


def test_gae_lambda_one_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 123.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    # gamma = lam = 1: A_t = R - V_t = [0.5, 0.4, 0.3]; returns = A + V = R = 1; padding -> 0
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.4, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_gae_discounted_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7, 123.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: delta = 1 + 0.9*0 - 0.7 = 0.3 ; A2 = 0.3
    # t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03 ; A1 = 0.03 + 0.72*0.3 = 0.246
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04 ; A0 = 0.04 + 0.72*0.246 = 0.21712
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0, 0.0]], dtype=torch.float64))


def _naive_gae(rewards, values, mask, gamma, lam):
    batch, length = rewards.shape
    adv = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        idx = [t for t in range(length) if mask[b, t] != 0]
        running = 0.0
        for j in range(len(idx) - 1, -1, -1):
            t = idx[j]
            v_next = values[b, idx[j + 1]].item() if j + 1 < len(idx) else 0.0
            delta = rewards[b, t].item() + gamma * v_next - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
    ret = torch.where(mask != 0, adv + values, torch.zeros_like(adv))
    return adv, ret


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.7, 0.0)])
def test_gae_matches_naive_loop(seed, gamma, lam):
    gen = torch.Generator().manual_seed(seed)
    batch, length = 6, 9
    mask = ragged_mask(batch, length, gen)
    mask[0, :2] = 0.0  # left padding in one row
    mask[1, 1] = 0.0 if mask[1].sum() > 2 else mask[1, 1]  # a hole
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    rewards = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = _naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ret, ref_ret, atol=1e-12, rtol=1e-12)


def test_gae_with_terminal_rewards_and_no_grad():
    values = torch.tensor([[0.2, 0.4, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    adv, ret = gae_advantages(terminal_rewards(torch.tensor([1.0]), mask), values, mask)
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.6, 0.0]]))
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_bad_inputs():
    with pytest.raises(ValueError, match="rewards"):
        gae_advantages(torch.zeros(2, 2), torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        gae_advantages(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 3))


# ----------------------------------------------------------------------------- value loss


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.9, 50.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, m = value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: (1-0)^2 = 1 ; clip(1.0, 0.3, 0.7) = 0.7 -> 0.49 ; max = 1 (unclipped)
    # token 1: (0.9-1)^2 = 0.01 ; clip(0.9, 0.3, 0.7) = 0.7 -> 0.09 ; max = 0.09 (clipped active)
    # loss = 0.5 * (1 + 0.09) / 2 = 0.2725
    assert loss.item() == pytest.approx(0.2725, abs=1e-6)
    assert m["vf_clip_frac"].item() == pytest.approx(0.5)
    assert m["value_mean"].item() == pytest.approx(0.95, abs=1e-6)
    # Var[G] = var(0, 1) = 0.25 ; G - V_old = (-0.5, 0.5) -> var 0.25 ; EV = 1 - 1 = 0
    assert m["explained_var"].item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    # token 0: d/dV 0.5 * (V-G)^2 / 2 = 0.5 * (V - G) = 0.5 ; token 1 clipped -> 0 ; padding -> 0
    torch.testing.assert_close(values.grad, torch.tensor([[0.5, 0.0, 0.0]]))


def test_value_loss_explained_variance_and_unclipped():
    values = torch.tensor([[0.0, 0.0, 0.0]])
    old = torch.tensor([[0.0, 1.0, 2.0]])
    returns = torch.tensor([[0.0, 2.0, 4.0]])
    mask = torch.ones(1, 3)
    loss, m = value_loss(values, old, returns, mask, clip_range=None)
    # unclipped: 0.5 * (0 + 4 + 16) / 3 = 3.333333
    assert loss.item() == pytest.approx(10.0 / 3.0, abs=1e-6)
    # Var[G] = var(0,2,4) = 8/3 ; G - V_old = (0,1,2) -> var 2/3 ; EV = 1 - 0.25 = 0.75
    assert m["explained_var"].item() == pytest.approx(0.75, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_loss_matches_naive_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, length, c = 4, 6, 0.2
    mask = ragged_mask(batch, length, gen)
    old = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    vals = (old + 0.4 * torch.randn(batch, length, generator=gen, dtype=torch.float64)).requires_grad_(True)
    ret = old + torch.randn(batch, length, generator=gen, dtype=torch.float64)
    loss, _ = value_loss(vals, old, ret, mask, clip_range=c)
    terms = []
    for b in range(batch):
        for t in range(length):
            if mask[b, t]:
                v, vo, g = vals[b, t], old[b, t], ret[b, t]
                vc = torch.clamp(v, vo.item() - c, vo.item() + c)
                terms.append(torch.maximum((v - g) ** 2, (vc - g) ** 2))
    ref = 0.5 * sum(terms) / len(terms)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    (g1,) = torch.autograd.grad(loss, vals)
    (g2,) = torch.autograd.grad(ref, vals)
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=1e-12)


def test_value_loss_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="returns"):
        value_loss(x, x, torch.zeros(2, 2), x)
    with pytest.raises(ValueError, match="old_values"):
        value_loss(x, torch.zeros(3), x, x)
