"""DVPO GVM targets and loss, and the stage-2 advantages (docs/dvpo.md)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_reason.losses.common import masked_whiten
from lit_reason.losses.dvpo import dvpo_advantages, dvpo_token_rewards, gvm_loss, td_lambda_targets
from lit_reason.losses.ppo import terminal_rewards

NAN = float("nan")


def ragged_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Right-padded bool mask with row lengths in [1, length]."""
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    return torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)


def naive_td_lambda(values, rewards, mask, gamma, lam):
    """Reference straight from the stage-1 targets of docs/dvpo.md, as explicit sums (no recursion):
    A_t = sum_l (gamma*lam)^l (r_{t+l} + gamma V(t+l+1) - V(t+l)), V after the end = 0; G = A + V."""
    out = torch.zeros(values.shape, dtype=torch.float64)
    for b in range(values.shape[0]):
        idx = [t for t in range(values.shape[1]) if mask[b, t]]
        v = [float(values[b, t]) for t in idx] + [0.0]
        r = [float(rewards[b, t]) for t in idx]
        n = len(idx)
        for i in range(n):
            adv = sum((gamma * lam) ** l * (r[i + l] + gamma * v[i + l + 1] - v[i + l]) for l in range(n - i))
            out[b, idx[i]] = adv + v[i]
    return out


# ----------------------------------------------------------------------------- td_lambda_targets


def test_td_lambda_targets_by_hand():
    # Row 0: 3 tokens, gamma = 1, lam = 0.5, V_old = [0.2, 0.4, 0.6], r = [0, 0, 1] (terminal).
    #   delta_t = r_t + gamma V(t+1) - V(t),  A_t = delta_t + gamma lam A_{t+1},  G_t = A_t + V(t)
    #   t=2: delta = 1 + 0 - 0.6 = 0.4              A = 0.4                    G = 1.0
    #   t=1: delta = 0 + 0.6 - 0.4 = 0.2            A = 0.2 + 0.5*0.4 = 0.4    G = 0.8
    #   t=0: delta = 0 + 0.4 - 0.2 = 0.2            A = 0.2 + 0.5*0.4 = 0.4    G = 0.6
    #   (lambda-return check: G_t = r_t + (1-lam) V(t+1) + lam G_{t+1}: 0.3+0.5 = 0.8, 0.2+0.4 = 0.6)
    # Row 1: 2 tokens + padding (garbage), V_old = [0.5, -0.5], r = [0, -1]:
    #   t=1: delta = -1 - (-0.5) = -0.5, A = -0.5, G = -1.0
    #   t=0: delta = 0 + (-0.5) - 0.5 = -1, A = -1 + 0.5*(-0.5) = -1.25, G = -0.75
    values = torch.tensor([[0.2, 0.4, 0.6], [0.5, -0.5, 99.0]], dtype=torch.float64)
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, NAN]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = td_lambda_targets(values, rewards, mask, gamma=1.0, lam=0.5)
    expected = torch.tensor([[0.6, 0.8, 1.0], [-0.75, -1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


def test_td_lambda_targets_with_discount_by_hand():
    # gamma = 0.9, lam = 1: G_t is the discounted return: G = [0.81, 0.9, 1] for r = [0, 0, 1]
    values, rewards, mask = torch.tensor([[0.3, -0.2, 0.7]]), torch.tensor([[0.0, 0.0, 1.0]]), torch.ones(1, 3)
    out = td_lambda_targets(values, rewards, mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(out, torch.tensor([[0.81, 0.9, 1.0]]))
    # lam = 0: one-step TD targets G_t = r_t + gamma V(t+1) = [0.9*-0.2, 0.9*0.7, 1]
    out = td_lambda_targets(values, rewards, mask, gamma=0.9, lam=0.0)
    torch.testing.assert_close(out, torch.tensor([[-0.18, 0.63, 1.0]]))


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0)])
def test_td_lambda_targets_match_naive_sums(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    batch, length = 6, 11
    mask = ragged_mask(batch, length, gen)
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    outcome = torch.where(torch.rand(batch, generator=gen) < 0.5, -1.0, 1.0).double()
    rewards = terminal_rewards(outcome, mask)
    values[~mask] = NAN  # padding must not leak
    out = td_lambda_targets(values, rewards, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(out, naive_td_lambda(values, rewards, mask, gamma, lam))
    # last valid token: G = r_last (the terminal value is 0)
    last = mask.long().sum(dim=1) - 1
    torch.testing.assert_close(out[torch.arange(batch), last], outcome)


def test_td_lambda_targets_are_detached_and_validated():
    values = torch.randn(2, 3, requires_grad=True)
    out = td_lambda_targets(values, torch.zeros(2, 3), torch.ones(2, 3))
    assert not out.requires_grad
    with pytest.raises(ValueError, match="`rewards`"):
        td_lambda_targets(values, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="`old_values`"):
        td_lambda_targets(torch.zeros(3), torch.zeros(3), torch.ones(3))


# ----------------------------------------------------------------------------- gvm_loss


def test_gvm_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, NAN], [0.5, 99.0, 99.0]], requires_grad=True)
    returns = torch.tensor([[0.0, 4.0, NAN], [1.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # valid squared errors: 1, 4, 1 -> 0.5 * 6 / 3 = 1.0 (no clipping)
    loss, metrics = gvm_loss(values, returns, mask)
    assert loss.item() == pytest.approx(1.0)
    assert metrics["gvm_loss"].item() == pytest.approx(1.0)
    assert metrics["value_mean"].item() == pytest.approx(3.5 / 3)
    assert metrics["return_mean"].item() == pytest.approx(5.5 / 3)
    # G = [0, 4, 1.5], mean 11/6; G - V = [-1, 2, 1], mean 2/3
    var_g = ((0 - 11 / 6) ** 2 + (4 - 11 / 6) ** 2 + (1.5 - 11 / 6) ** 2) / 3
    var_r = ((-1 - 2 / 3) ** 2 + (2 - 2 / 3) ** 2 + (1 - 2 / 3) ** 2) / 3
    assert metrics["explained_var"].item() == pytest.approx(1 - var_r / var_g)
    assert all(not m.requires_grad for m in metrics.values())
    loss.backward()
    # d/dV_t = 0.5 * 2 (V - G) / n = (V - G) / 3 ; 0 at masked positions
    torch.testing.assert_close(values.grad, torch.tensor([[1 / 3, -2 / 3, 0.0], [-1 / 3, 0.0, 0.0]]))


def test_gvm_loss_does_not_backprop_into_returns():
    values = torch.randn(2, 4, requires_grad=True)
    returns = torch.randn(2, 4, requires_grad=True)
    loss, _ = gvm_loss(values, returns, torch.ones(2, 4))
    loss.backward()
    assert returns.grad is None
    with pytest.raises(ValueError, match="`mask`"):
        gvm_loss(values, returns, torch.ones(2, 3))


# ----------------------------------------------------------------------------- dvpo rewards / advantages


def test_dvpo_advantages_gae_by_hand():
    # One sequence of 3 valid tokens, then padding holding garbage.
    gvm = torch.tensor([[1.0, 2.0, 3.0, 1e6]], dtype=torch.float64)
    logp_old = torch.tensor([[-1.0, -2.0, -3.0, NAN]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -2.0, -2.5, NAN]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    # V = masked whiten of [1, 2, 3]: mean 2, unbiased var 1 -> [-1, 0, 1] (padding excluded)
    # r_t = -0.2 * (logp_old - ref) = -0.2 * [0.5, 0, -0.5] = [-0.1, 0, 0.1]
    # GAE, gamma = 1, lam = 0.5, V after the end = 0:
    #   t=2: delta = 0.1 + 0 - 1 = -0.9                 A = -0.9
    #   t=1: delta = 0 + 1 - 0 = 1                       A = 1 + 0.5 * -0.9 = 0.55
    #   t=0: delta = -0.1 + 0 - (-1) = 0.9               A = 0.9 + 0.5 * 0.55 = 1.175
    raw = [1.175, 0.55, -0.9]
    mean = sum(raw) / 3
    std = math.sqrt(sum((a - mean) ** 2 for a in raw) / 2)  # unbiased
    expected = torch.tensor([[(a - mean) / std for a in raw] + [0.0]], dtype=torch.float64)
    out = dvpo_advantages(gvm, logp_old, ref, mask, mode="gae", kl_coef=0.2, gamma=1.0, lam=0.5)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)

    # whiten=False: raw V = [1, 2, 3]:
    #   t=2: 0.1 - 3 = -2.9 ; t=1: 0 + 3 - 2 + 0.5 * -2.9 = -0.45 ; t=0: -0.1 + 2 - 1 + 0.5 * -0.45 = 0.675
    out = dvpo_advantages(gvm, logp_old, ref, mask, mode="gae", kl_coef=0.2, gamma=1.0, lam=0.5, whiten=False)
    torch.testing.assert_close(out, torch.tensor([[0.675, -0.45, -2.9, 0.0]], dtype=torch.float64))


def test_dvpo_advantages_static_by_hand():
    gvm = torch.tensor([[1.0, 2.0, 3.0, 1e6]])
    logp = torch.tensor([[-1.0, -2.0, -3.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # the whitened frozen value itself: [-1, 0, 1]; KL reward unused
    out = dvpo_advantages(gvm, logp, logp - 5.0, mask, mode="static")
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    out = dvpo_advantages(gvm, logp, logp - 5.0, mask, mode="static", whiten=False)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


def test_dvpo_advantages_telescoping_sanity():
    # gamma = lam = 1 and no KL reward: A_t = sum of deltas = R - V_t (V after the end = 0)
    gvm = torch.tensor([[0.3, -0.2, 0.6], [0.1, 0.4, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    out = dvpo_advantages(gvm, zeros, zeros, mask, gamma=1.0, lam=1.0, whiten=False)
    torch.testing.assert_close(out, torch.where(mask.bool(), -gvm, zeros))
    R = torch.tensor([1.0, -1.0], dtype=torch.float64)
    out = dvpo_advantages(gvm, zeros, zeros, mask, gamma=1.0, lam=1.0, whiten=False, task_rewards=R)
    torch.testing.assert_close(out, torch.where(mask.bool(), R.unsqueeze(1) - gvm, zeros))


def test_value_whitening_ignores_padding():
    gen = torch.Generator().manual_seed(5)
    batch, length = 4, 6
    mask = ragged_mask(batch, length, gen)
    gvm = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    logp = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    ref = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    base = {m: dvpo_advantages(gvm, logp, ref, mask, mode=m) for m in ("gae", "static")}
    # different garbage at padding and extra padded columns: same advantages on the valid tokens
    pad = torch.full((batch, 3), 1e3, dtype=torch.float64)
    gvm2 = torch.cat([torch.where(mask, gvm, torch.full_like(gvm, -50.0)), pad], dim=1)
    logp2, ref2 = torch.cat([logp, pad], dim=1), torch.cat([ref, -pad], dim=1)
    mask2 = torch.cat([mask, torch.zeros(batch, 3, dtype=torch.bool)], dim=1)
    for m in ("gae", "static"):
        out = dvpo_advantages(gvm2, logp2, ref2, mask2, mode=m)
        torch.testing.assert_close(out[:, :length], base[m])
        assert bool((out[:, length:] == 0).all())
    # static = masked whitening of the GVM values
    torch.testing.assert_close(base["static"], masked_whiten(gvm, mask))


def test_dvpo_advantages_gae_matches_naive_composition():
    gen = torch.Generator().manual_seed(6)
    batch, length, kl_coef, gamma, lam = 5, 9, 0.2, 1.0, 0.95
    mask = ragged_mask(batch, length, gen)
    gvm = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    logp = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    ref = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    out = dvpo_advantages(gvm, logp, ref, mask, kl_coef=kl_coef, gamma=gamma, lam=lam)
    # naive: whiten V over the valid entries, A = G - V from the explicit sums, whiten A
    vals = gvm[mask]
    v = torch.where(mask, (gvm - vals.mean()) / torch.sqrt(vals.var(unbiased=True) + 1e-8), torch.zeros_like(gvm))
    r = torch.where(mask, -kl_coef * (logp - ref), torch.zeros_like(gvm))
    adv = naive_td_lambda(v, r, mask, gamma, lam) - v
    a = adv[mask]
    expected = torch.where(mask, (adv - a.mean()) / torch.sqrt(a.var(unbiased=True) + 1e-8), torch.zeros_like(adv))
    torch.testing.assert_close(out, expected)


def test_task_reward_changes_only_the_last_tokens_reward():
    gen = torch.Generator().manual_seed(7)
    batch, length, gamma, lam = 5, 8, 1.0, 0.95
    mask = ragged_mask(batch, length, gen)
    logp = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    ref = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    R = torch.where(torch.rand(batch, generator=gen) < 0.5, -1.0, 1.0).double()
    r0 = dvpo_token_rewards(logp, ref, mask, kl_coef=0.2)
    r1 = dvpo_token_rewards(logp, ref, mask, kl_coef=0.2, task_rewards=R)
    last = mask.long().sum(dim=1) - 1
    diff = r1 - r0
    expected_diff = torch.zeros_like(diff)
    expected_diff[torch.arange(batch), last] = R
    torch.testing.assert_close(diff, expected_diff)
    # KL-only reward by hand at one token: -0.2 * (logp - ref)
    assert r0[0, 0].item() == pytest.approx(-0.2 * (logp[0, 0] - ref[0, 0]).item())

    # GAE is linear in r: unwhitened advantages shift by (gamma*lam)^(last - t) * R
    gvm = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    a0 = dvpo_advantages(gvm, logp, ref, mask, gamma=gamma, lam=lam, whiten=False)
    a1 = dvpo_advantages(gvm, logp, ref, mask, gamma=gamma, lam=lam, whiten=False, task_rewards=R)
    t = torch.arange(length).unsqueeze(0)
    decay = (gamma * lam) ** (last.unsqueeze(1) - t).double()
    shift = torch.where(mask, decay * R.unsqueeze(1), torch.zeros_like(gvm))
    torch.testing.assert_close(a1 - a0, shift)


def test_dvpo_advantages_validation():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"'gae', 'static'"):
        dvpo_advantages(x, x, x, m, mode="paper")
    with pytest.raises(ValueError, match="`task_rewards`"):
        dvpo_advantages(x, x, x, m, mode="static", task_rewards=torch.ones(2))
    with pytest.raises(ValueError, match="`ref_logprobs`"):
        dvpo_advantages(x, x, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match="`mask`"):
        dvpo_advantages(x, x, x, torch.ones(3, 3))
    out = dvpo_advantages(torch.randn(2, 3, requires_grad=True), x, x, m)
    assert not out.requires_grad
