"""OREO losses (docs/oreo.md and "Variants"): hand-computed numbers, naive
loop references on ragged masks, stop-gradient checks and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from lit_reason.losses.oreo import (
    oreo_importance_weights,
    oreo_policy_loss,
    oreo_response_loss,
    oreo_step_policy_loss,
    oreo_step_value_loss,
    oreo_token_residuals,
    oreo_value_loss,
    step_log_ratios,
    step_start_values,
)

NAN = float("nan")


def ragged_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Right-padded bool mask with row lengths in [1, length] (first row full, last row length 1)."""
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0], lengths[-1] = length, 1
    return torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)


def random_inputs(seed: int, batch: int = 5, length: int = 7):
    gen = torch.Generator().manual_seed(seed)
    mask = ragged_mask(batch, length, gen)
    logp = (-torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    ref = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64).requires_grad_()
    rewards = torch.randint(0, 2, (batch,), generator=gen).double()
    kl = torch.rand(batch, length, generator=gen, dtype=torch.float64)
    # garbage at padding must never leak
    with torch.no_grad():
        logp[~mask] = NAN
        values[~mask] = float("inf")
    ref = ref.masked_fill(~mask, NAN)
    kl = kl.masked_fill(~mask, NAN)
    return logp, ref, values, rewards, mask, kl


# ----------------------------------------------------------------------------- hand example
#
# beta = 0.5, B = 2, L = 3, R = [1, 0]
# row 0 (3 tokens): l = logp - ref = [-1+1.5, -2+1, -0.5+1] = [0.5, -1, 0.5]
#                   A_t = sum_{i>=t} l_i = [0, -0.5, 0.5] ; V = [0.2, 0.4, 0.6]
#                   delta = V + 0.5*A - R = [0.2+0-1, 0.4-0.25-1, 0.6+0.25-1] = [-0.8, -0.85, -0.15]
#                   mean delta^2 = (0.64 + 0.7225 + 0.0225) / 3 = 1.385 / 3 = 0.4616667
# row 1 (2 tokens, 1 padding with garbage): l = [-0.2+0.4, -0.3+0.1] = [0.2, -0.2]
#                   A = [0, -0.2] ; V = [0.1, -0.3] ; delta = [0.1 + 0 - 0, -0.3 - 0.1 - 0] = [0.1, -0.4]
#                   mean delta^2 = (0.01 + 0.16) / 2 = 0.085
# loss = (0.4616667 + 0.085) / 2 = 0.2733333


def hand_inputs():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, NAN]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-0.4, -0.1, 7.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [0.1, -0.3, 99.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    rewards = torch.tensor([1.0, 0.0])
    return logp, ref, values, rewards, mask


def test_token_residuals_by_hand():
    logp, ref, values, rewards, mask = hand_inputs()
    res = oreo_token_residuals(values, logp, ref, rewards, mask, beta=0.5)
    torch.testing.assert_close(res, torch.tensor([[-0.8, -0.85, -0.15], [0.1, -0.4, 0.0]]))


def test_value_loss_by_hand():
    logp, ref, values, rewards, mask = hand_inputs()
    loss, m = oreo_value_loss(values, logp, ref, rewards, mask, beta=0.5)
    assert loss.item() == pytest.approx(0.2733333, abs=1e-6)
    assert m["value_loss"].item() == pytest.approx(0.2733333, abs=1e-6)
    # residual token-mean over the 5 states: (-0.8 - 0.85 - 0.15 + 0.1 - 0.4) / 5 = -0.42
    assert m["residual_mean"].item() == pytest.approx(-0.42, abs=1e-6)
    assert m["residual_abs_mean"].item() == pytest.approx(0.46, abs=1e-6)
    # value mean over states: (0.2 + 0.4 + 0.6 + 0.1 - 0.3) / 5 = 0.2
    assert m["value_mean"].item() == pytest.approx(0.2, abs=1e-6)
    assert all(not t.requires_grad and t.dim() == 0 for t in m.values())
    loss.backward()
    # dL/dV_t = 2 * delta_t / (|S_b| * B): row 0 /6, row 1 /4; padding 0
    expected = torch.tensor([[-1.6 / 6, -1.7 / 6, -0.3 / 6], [0.2 / 4, -0.8 / 4, 0.0]])
    torch.testing.assert_close(values.grad, expected)
    assert logp.grad is None  # no gradient reaches the policy (sg[A_t])


def test_policy_loss_by_hand_with_kl():
    logp, ref, values, rewards, mask = hand_inputs()
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.2, 100.0]])
    loss, m = oreo_policy_loss(logp, ref, values, rewards, mask, beta=0.5, alpha=0.1, kl=kl)
    # Bellman part has the same residuals as the value loss: 0.2733333
    # KL: per-sequence means 0.6/3 = 0.2 and 0.6/2 = 0.3 -> batch mean 0.25 -> alpha * 0.25 = 0.025
    assert m["policy_loss"].item() == pytest.approx(0.2733333, abs=1e-6)
    assert m["kl_loss"].item() == pytest.approx(0.025, abs=1e-7)
    # token-mean KL metric: (0.1 + 0.2 + 0.3 + 0.4 + 0.2) / 5 = 0.24
    assert m["kl"].item() == pytest.approx(0.24, abs=1e-6)
    assert loss.item() == pytest.approx(0.2983333, abs=1e-6)
    loss.backward()
    # dL/dlogp_t = 2 * beta * delta_t / (|S_b| * B) (future log-ratios are stopped):
    # row 0: (-0.8, -0.85, -0.15) / 6 ; row 1: (0.1, -0.4) / 4
    expected = torch.tensor([[-0.8 / 6, -0.85 / 6, -0.15 / 6], [0.1 / 4, -0.4 / 4, 0.0]])
    torch.testing.assert_close(logp.grad, expected)
    assert values.grad is None  # d loss / d values == 0


def test_policy_loss_kl_gradient_flows_through_kl():
    logp, ref, values, rewards, mask = hand_inputs()
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.2, 100.0]], requires_grad=True)
    loss, _ = oreo_policy_loss(logp, ref, values, rewards, mask, beta=0.5, alpha=0.1, kl=kl)
    loss.backward()
    # d(alpha * mean_b (1/|resp_b|) sum_t KL_t) / dKL_t = alpha / (|resp_b| * B): 0.1/6 and 0.1/4
    torch.testing.assert_close(kl.grad, torch.tensor([[0.1 / 6] * 3, [0.1 / 4, 0.1 / 4, 0.0]]))


def test_importance_weights_by_hand():
    logp = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, NAN]])
    ref = torch.tensor([[-1.5, -0.5], [0.5, 0.5], [-0.3, 5.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]])
    w = oreo_importance_weights(logp, ref, mask, cap=1.0)
    # sums of l: 2.0 -> capped at 1 -> e ; -1.0 -> e^-1 ; 0.3 -> e^0.3
    torch.testing.assert_close(w, torch.tensor([math.e, math.exp(-1.0), math.exp(0.3)]))
    assert not w.requires_grad


def test_policy_loss_importance_weights_multiply_each_sequence():
    logp, ref, values, rewards, mask = hand_inputs()
    w = torch.tensor([2.0, 0.5], requires_grad=True)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.2, 100.0]])
    loss, m = oreo_policy_loss(logp, ref, values, rewards, mask, beta=0.5, alpha=0.1, kl=kl, importance_weights=w)
    # (2 * 0.4616667 + 0.5 * 0.085) / 2 = (0.9233333 + 0.0425) / 2 = 0.4829167 ; KL unweighted 0.025
    assert m["policy_loss"].item() == pytest.approx(0.4829167, abs=1e-6)
    assert loss.item() == pytest.approx(0.5079167, abs=1e-6)
    assert m["weight_mean"].item() == pytest.approx(1.25)
    loss.backward()
    assert w.grad is None  # weights are detached


# ----------------------------------------------------------------------------- naive references


def naive_value_and_policy(logp, ref, values, rewards, mask, kl, beta, alpha, weights=None):
    """Plain Python loops over sequences and tokens (floats, no autograd)."""
    B, L = mask.shape
    v_loss, p_loss, kl_total = 0.0, 0.0, 0.0
    for b in range(B):
        idx = [t for t in range(L) if mask[b, t]]
        l = {t: float(logp[b, t]) - float(ref[b, t]) for t in idx}
        seq = 0.0
        for t in idx:
            a_t = sum(l[i] for i in idx if i >= t)
            seq += (float(values[b, t]) + beta * a_t - float(rewards[b])) ** 2
        w = 1.0 if weights is None else float(weights[b])
        v_loss += seq / len(idx)
        p_loss += w * seq / len(idx)
        kl_total += sum(float(kl[b, t]) for t in idx) / len(idx)
    return v_loss / B, p_loss / B + alpha * kl_total / B


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_token_losses_match_naive_loops(seed):
    logp, ref, values, rewards, mask, kl = random_inputs(seed)
    weights = oreo_importance_weights(logp, ref, mask)
    ref_v, ref_p = naive_value_and_policy(logp.detach(), ref, values.detach(), rewards, mask, kl, 0.3, 0.05, weights)
    v_loss, _ = oreo_value_loss(values, logp, ref, rewards, mask, beta=0.3)
    p_loss, _ = oreo_policy_loss(
        logp, ref, values, rewards, mask, beta=0.3, alpha=0.05, kl=kl, importance_weights=weights
    )
    assert v_loss.item() == pytest.approx(ref_v, rel=1e-10, abs=1e-12)
    assert p_loss.item() == pytest.approx(ref_p, rel=1e-10, abs=1e-12)
    # float mask gives the same result as the bool mask
    p_loss_f, _ = oreo_policy_loss(
        logp, ref, values, rewards, mask.double(), beta=0.3, alpha=0.05, kl=kl, importance_weights=weights
    )
    assert p_loss_f.item() == pytest.approx(p_loss.item(), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_gradient_comes_only_from_own_residual(seed):
    logp, ref, values, rewards, mask, kl = random_inputs(seed)
    beta = 0.3
    loss, _ = oreo_policy_loss(logp, ref, values, rewards, mask, beta=beta, alpha=0.0)
    g_logp, g_values = torch.autograd.grad(loss, [logp, values], allow_unused=True)
    assert g_values is None or bool((g_values == 0).all())
    res = oreo_token_residuals(values.detach(), logp.detach(), ref, rewards, mask, beta=beta)
    counts = mask.sum(dim=1, keepdim=True).double()
    expected = torch.where(mask, 2 * beta * res / (counts * mask.shape[0]), torch.zeros_like(res))
    torch.testing.assert_close(g_logp, expected)
    assert torch.isfinite(g_logp).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_value_gradient_does_not_reach_logprobs(seed):
    logp, ref, values, rewards, mask, _ = random_inputs(seed)
    loss, _ = oreo_value_loss(values, logp, ref, rewards, mask, beta=0.3)
    g_logp, g_values = torch.autograd.grad(loss, [logp, values], allow_unused=True)
    assert g_logp is None
    res = oreo_token_residuals(values.detach(), logp.detach(), ref, rewards, mask, beta=0.3)
    counts = mask.sum(dim=1, keepdim=True).double()
    torch.testing.assert_close(g_values, torch.where(mask, 2 * res / (counts * mask.shape[0]), torch.zeros_like(res)))


# ----------------------------------------------------------------------------- step level
#
# Same tokens as the hand example; beta = 0.5. Steps: row 0 step_ids [0, 0, 1] (T=2),
# row 1 step_ids [0, 1, -1] (T=2).
# row 0: L_0 = 0.5 - 1 = -0.5, L_1 = 0.5 ; V(S_k) = [0.2, 0.6]
#        delta_0 = 0.2 + 0.5*(-0.5 + 0.5) - 1 = -0.8 ; delta_1 = 0.6 + 0.5*0.5 - 1 = -0.15
#        mean delta^2 = (0.64 + 0.0225) / 2 = 0.33125
# row 1: L = [0.2, -0.2] ; V(S_k) = [0.1, -0.3]
#        delta_0 = 0.1 + 0.5*(0.2 - 0.2) - 0 = 0.1 ; delta_1 = -0.3 + 0.5*(-0.2) = -0.4
#        mean delta^2 = (0.01 + 0.16) / 2 = 0.085
# loss = (0.33125 + 0.085) / 2 = 0.208125


def step_inputs():
    logp, ref, _, rewards, mask = hand_inputs()
    step_values = torch.tensor([[0.2, 0.6], [0.1, -0.3]], requires_grad=True)
    step_ids = torch.tensor([[0, 0, 1], [0, 1, -1]])
    num_steps = torch.tensor([2, 2])
    return logp, ref, step_values, rewards, step_ids, num_steps, mask


def test_step_log_ratios_is_strict_only_with_a_mask():
    # one implementation (losses/common.py) for OREO's step level and DVO: token 2 sits in step 1,
    # past num_steps = 1. Without a mask it is dropped (DVO's truncated steps): L_0 = -1 + -2 = -3;
    # with a mask that marks it valid, it is an error (OREO: every valid token belongs to a step)
    logp, ref = torch.tensor([[-1.0, -2.0, -4.0]]), torch.zeros(1, 3)
    step_ids, num_steps = torch.tensor([[0, 0, 1]]), torch.tensor([1])
    torch.testing.assert_close(step_log_ratios(logp, ref, step_ids, num_steps, 2), torch.tensor([[-3.0, 0.0]]))
    with pytest.raises(ValueError, match="rows \\[0\\]"):
        step_log_ratios(logp, ref, step_ids, num_steps, 2, mask=torch.ones(1, 3))
    masked = step_log_ratios(logp, ref, step_ids, num_steps, 2, mask=torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(masked, torch.tensor([[-1.0, 0.0]]))  # token 1 masked out


def test_step_log_ratios_and_start_values_by_hand():
    logp, ref, _, _, step_ids, num_steps, mask = step_inputs()
    got = step_log_ratios(logp, ref, step_ids, num_steps, mask=mask)
    torch.testing.assert_close(got, torch.tensor([[-0.5, 0.5], [0.2, -0.2]]))
    values = torch.tensor([[0.2, 0.4, 0.6], [0.1, -0.3, 99.0]])
    # step_ends row 0 = [1, 2] -> starts [0, 2] ; row 1 = [0, 1] -> starts [0, 1]
    step_ends = torch.tensor([[1, 2], [0, 1]])
    torch.testing.assert_close(step_start_values(values, step_ends, num_steps), torch.tensor([[0.2, 0.6], [0.1, -0.3]]))
    # a padded step (k >= T) reads 0: row 1 has one step only
    out = step_start_values(values, torch.tensor([[1, 2], [1, -1]]), torch.tensor([2, 1]))
    torch.testing.assert_close(out, torch.tensor([[0.2, 0.6], [0.1, 0.0]]))


def test_step_policy_loss_by_hand():
    logp, ref, step_values, rewards, step_ids, num_steps, mask = step_inputs()
    loss, m = oreo_step_policy_loss(logp, ref, step_values, rewards, step_ids, num_steps, mask, beta=0.5, alpha=0.0)
    assert loss.item() == pytest.approx(0.208125, abs=1e-6)
    # residual mean over the 4 steps: (-0.8 - 0.15 + 0.1 - 0.4) / 4 = -0.3125
    assert m["residual_mean"].item() == pytest.approx(-0.3125, abs=1e-6)
    loss.backward()
    # dL/dlogp_t = 2*beta*delta_{k(t)} / (T_b * B): row 0 tokens 0,1 -> -0.8/4, token 2 -> -0.15/4
    # row 1: 0.1/4, -0.4/4
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.2, -0.2, -0.0375], [0.025, -0.1, 0.0]]))
    assert step_values.grad is None


def test_step_value_loss_by_hand():
    logp, ref, step_values, rewards, step_ids, num_steps, mask = step_inputs()
    loss, _ = oreo_step_value_loss(step_values, logp, ref, rewards, step_ids, num_steps, mask, beta=0.5)
    assert loss.item() == pytest.approx(0.208125, abs=1e-6)
    loss.backward()
    # dL/dV(S_k) = 2*delta_k / (T_b * B) = delta_k / 2
    torch.testing.assert_close(step_values.grad, torch.tensor([[-0.4, -0.075], [0.05, -0.2]]))
    assert logp.grad is None


def test_step_policy_loss_matches_naive_loop():
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        B, L, S = 4, 9, 4
        mask = ragged_mask(B, L, gen)
        lengths = mask.sum(1)
        step_ids = torch.full((B, L), -1)
        num_steps = torch.zeros(B, dtype=torch.long)
        for b in range(B):
            n = int(lengths[b])
            cuts = sorted(set(torch.randint(1, max(n, 2), (S - 1,), generator=gen).tolist()) - {n})
            bounds = [0] + [c for c in cuts if c < n] + [n]
            for k in range(len(bounds) - 1):
                step_ids[b, bounds[k] : bounds[k + 1]] = k
            num_steps[b] = len(bounds) - 1
        logp = (-torch.rand(B, L, generator=gen, dtype=torch.float64)).requires_grad_()
        ref = -torch.rand(B, L, generator=gen, dtype=torch.float64)
        sv = torch.randn(B, S, generator=gen, dtype=torch.float64)
        R = torch.randint(0, 2, (B,), generator=gen).double()
        kl = torch.rand(B, L, generator=gen, dtype=torch.float64)
        beta, alpha = 0.2, 0.1
        expected = 0.0
        for b in range(B):
            T = int(num_steps[b])
            Ls = [
                sum(float(logp[b, t].detach() - ref[b, t]) for t in range(L) if mask[b, t] and step_ids[b, t] == k)
                for k in range(T)
            ]
            seq = sum((float(sv[b, k]) + beta * sum(Ls[k:]) - float(R[b])) ** 2 for k in range(T)) / T
            klb = sum(float(kl[b, t]) for t in range(L) if mask[b, t]) / int(lengths[b])
            expected += (seq + alpha * klb) / B
        loss, _ = oreo_step_policy_loss(logp, ref, sv, R, step_ids, num_steps, mask, beta=beta, alpha=alpha, kl=kl)
        assert loss.item() == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------------- response level
#
# beta = 0.5: row 0 sum l = 0.5 - 1 + 0.5 = 0, V(s_0) = 0.2, R = 1 -> delta = 0.2 + 0 - 1 = -0.8
#             row 1 sum l = 0.2 - 0.2 = 0, V(s_0) = 0.1, R = 0 -> delta = 0.1
# loss = (0.64 + 0.01) / 2 = 0.325 ; dL/dlogp_t = 2*beta*delta_b / B = -0.4 (row 0), 0.05 (row 1)


def test_response_loss_by_hand():
    logp, ref, values, rewards, mask = hand_inputs()
    loss, m = oreo_response_loss(logp, ref, values, rewards, mask, beta=0.5, alpha=0.0)
    assert loss.item() == pytest.approx(0.325, abs=1e-6)
    assert m["value_mean"].item() == pytest.approx(0.15, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.4, -0.4, -0.4], [0.05, 0.05, 0.0]]))
    assert values.grad is None
    # V(s_0) given per sequence gives the same loss
    loss0, _ = oreo_response_loss(logp, ref, torch.tensor([0.2, 0.1]), rewards, mask, beta=0.5, alpha=0.0)
    assert loss0.item() == pytest.approx(0.325, abs=1e-6)


def test_response_loss_with_kl_and_weights():
    logp, ref, values, rewards, mask = hand_inputs()
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.2, NAN]])
    w = torch.tensor([0.5, 2.0])
    loss, _ = oreo_response_loss(logp, ref, values, rewards, mask, beta=0.5, alpha=0.3, kl=kl, importance_weights=w)
    # (0.5 * 0.64 + 2 * 0.01) / 2 = 0.17 ; KL 0.3 * 0.25 = 0.075 -> 0.245
    assert loss.item() == pytest.approx(0.245, abs=1e-6)


# ----------------------------------------------------------------------------- bad input


def test_shape_mismatch_names_argument():
    logp, ref, values, rewards, mask = hand_inputs()
    with pytest.raises(ValueError, match="ref_logprobs"):
        oreo_policy_loss(logp, ref[:, :2], values, rewards, mask)
    with pytest.raises(ValueError, match="values"):
        oreo_policy_loss(logp, ref, values[:, :2], rewards, mask)
    with pytest.raises(ValueError, match="rewards"):
        oreo_value_loss(values, logp, ref, rewards[:1], mask)
    with pytest.raises(ValueError, match="mask"):
        oreo_value_loss(values, logp, ref, rewards, mask[:, :2])
    with pytest.raises(ValueError, match="kl"):
        oreo_policy_loss(logp, ref, values, rewards, mask, kl=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="importance_weights"):
        oreo_policy_loss(logp, ref, values, rewards, mask, importance_weights=torch.ones(3))
    with pytest.raises(ValueError, match="values"):
        oreo_response_loss(logp, ref, torch.zeros(3), rewards, mask)


def test_empty_mask_row_raises():
    logp, ref, values, rewards, mask = hand_inputs()
    mask = mask.clone()
    mask[1] = False
    for call in (
        lambda: oreo_value_loss(values, logp, ref, rewards, mask),
        lambda: oreo_policy_loss(logp, ref, values, rewards, mask),
        lambda: oreo_response_loss(logp, ref, values, rewards, mask),
    ):
        with pytest.raises(ValueError, match="mask"):
            call()


def test_step_inputs_validated():
    logp, ref, step_values, rewards, step_ids, num_steps, mask = step_inputs()
    with pytest.raises(ValueError, match="step_ids"):  # a valid token outside every step
        oreo_step_policy_loss(logp, ref, step_values, rewards, torch.tensor([[0, 0, -1], [0, 1, -1]]), num_steps, mask)
    with pytest.raises(ValueError, match="step_ids"):  # step index >= num_steps
        oreo_step_policy_loss(logp, ref, step_values, rewards, step_ids, torch.tensor([1, 2]), mask)
    with pytest.raises(ValueError, match="num_steps"):
        oreo_step_value_loss(step_values, logp, ref, rewards, step_ids, torch.tensor([3, 2]), mask)
    with pytest.raises(ValueError, match="step_values"):
        oreo_step_policy_loss(logp, ref, step_values[:1], rewards, step_ids, num_steps, mask)
