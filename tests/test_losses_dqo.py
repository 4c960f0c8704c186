"""DQO reconstruction (docs/dqo.md): lambda-returns by hand, a naive loop
reference, the stop-gradient switch, and the required identity with OREO's token-level loss."""

from __future__ import annotations

import pytest
import torch

from lit_reason.losses.dqo import dqo_lambda_returns, dqo_losses, dqo_policy_loss, dqo_residuals, dqo_value_loss
from lit_reason.losses.oreo import oreo_importance_weights, oreo_policy_loss, oreo_token_residuals, oreo_value_loss

NAN = float("nan")


def ragged_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Right-padded bool mask with row lengths in [1, length] (first row full, last row length 1)."""
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0], lengths[-1] = length, 1
    return torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)


def holey_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Random mask with interior holes; every row keeps at least one valid token."""
    mask = torch.rand(batch, length, generator=gen) < 0.6
    mask[:, 0] |= ~mask.any(dim=1)
    return mask


def random_inputs(seed: int, batch: int = 5, length: int = 7, holes: bool = False):
    gen = torch.Generator().manual_seed(seed)
    mask = holey_mask(batch, length, gen) if holes else ragged_mask(batch, length, gen)
    logp = (-torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    ref = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64).requires_grad_()
    rewards = torch.randint(0, 2, (batch,), generator=gen).double()
    with torch.no_grad():  # garbage at padding must never leak
        logp[~mask] = NAN
        values[~mask] = float("inf")
    return logp, ref.masked_fill(~mask, NAN), values, rewards, mask


# ----------------------------------------------------------------------------- hand example
#
# beta = 0.5, lam = 0.5, one row of 3 tokens, R = 1
# l = [0.5, -1, 0.5] ; V = [0.2, 0.4, 0.6] ; r = [0, 0, 1]
# r~ = r - beta*l = [-0.25, 0.5, 0.75]
# G_2 = r~_2 + (1-lam)*V(s_3)=0 + lam*G_3=0          = 0.75
# G_1 = r~_1 + 0.5*V_2 + 0.5*G_2 = 0.5 + 0.3 + 0.375  = 1.175
# G_0 = r~_0 + 0.5*V_1 + 0.5*G_1 = -0.25 + 0.2 + 0.5875 = 0.5375
# value residual V - G = [-0.3375, -0.775, -0.15]
#   L_V = (0.11390625 + 0.600625 + 0.0225) / 3 = 0.73703125 / 3 = 0.2456770833
# Q residual beta*l_h + V_h - r_h - G_{h+1}:
#   h0: 0.25 + 0.2 - 0 - 1.175 = -0.725 ; h1: -0.5 + 0.4 - 0 - 0.75 = -0.85 ; h2: 0.25 + 0.6 - 1 - 0 = -0.15
#   L_Q = (0.525625 + 0.7225 + 0.0225) / 3 = 1.270625 / 3 = 0.4235416667


def hand_inputs():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -1.0]])
    values = torch.tensor([[0.2, 0.4, 0.6]], requires_grad=True)
    return logp, ref, values, torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.bool)


def test_lambda_returns_and_losses_by_hand():
    logp, ref, values, rewards, mask = hand_inputs()
    G = dqo_lambda_returns(logp, ref, values, rewards, mask, beta=0.5, lam=0.5)
    torch.testing.assert_close(G, torch.tensor([[0.5375, 1.175, 0.75]]))
    v_res, q_res = dqo_residuals(logp, ref, values, rewards, mask, beta=0.5, lam=0.5)
    torch.testing.assert_close(v_res, torch.tensor([[-0.3375, -0.775, -0.15]]))
    torch.testing.assert_close(q_res, torch.tensor([[-0.725, -0.85, -0.15]]))
    v_loss, p_loss, m = dqo_losses(logp, ref, values, rewards, mask, beta=0.5, lam=0.5)
    assert v_loss.item() == pytest.approx(0.2456770833, abs=1e-6)
    assert p_loss.item() == pytest.approx(0.4235416667, abs=1e-6)
    # return mean (0.5375 + 1.175 + 0.75) / 3 = 0.8208333 ; q residual mean (-0.725 - 0.85 - 0.15)/3 = -0.575
    assert m["return_mean"].item() == pytest.approx(0.8208333, abs=1e-6)
    assert m["q_residual_mean"].item() == pytest.approx(-0.575, abs=1e-6)
    assert all(not t.requires_grad and t.dim() == 0 for t in m.values())
    # "sum" reduction: the reconstruction's literal sum over h
    _, p_sum, _ = dqo_losses(logp, ref, values, rewards, mask, beta=0.5, lam=0.5, token_reduction="sum")
    assert p_sum.item() == pytest.approx(1.270625, abs=1e-6)


def test_lambda_zero_is_one_step_td():
    logp, ref, values, rewards, mask = hand_inputs()
    # lam = 0: G_h = r~_h + V(s_{h+1}) = [-0.25 + 0.4, 0.5 + 0.6, 0.75 + 0] = [0.15, 1.1, 0.75]
    G = dqo_lambda_returns(logp, ref, values, rewards, mask, beta=0.5, lam=0.0)
    torch.testing.assert_close(G, torch.tensor([[0.15, 1.1, 0.75]]))


def test_gradients_by_hand_both_switches():
    # Without stop-gradient (default), G_{h+1} depends on the future l_i:
    #   d res_h / d l_h = beta ; d res_h / d l_{h+1} = +beta ; d res_h / d l_{h+2} = +lam*beta
    # dL_Q/dl_t = (2/3) * sum_h res_h * d res_h / d l_t:
    #   l_0: (2/3) * 0.5*(-0.725)                                   = -0.2416667
    #   l_1: (2/3) * (0.5*(-0.85) + 0.5*(-0.725))                  = -0.525
    #   l_2: (2/3) * (0.5*(-0.15) + 0.5*(-0.85) + 0.25*(-0.725))   = -0.4541667
    logp, ref, values, rewards, mask = hand_inputs()
    loss, _ = dqo_policy_loss(logp, ref, values, rewards, mask, beta=0.5, lam=0.5, stop_grad_future=False)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.2416667, -0.525, -0.4541667]]))
    assert values.grad is None
    # With stop_grad_future: only the own residual, dL/dl_t = (2/3)*beta*res_t = [-0.2416667, -0.2833333, -0.05]
    logp, ref, values, rewards, mask = hand_inputs()
    loss, _ = dqo_policy_loss(logp, ref, values, rewards, mask, beta=0.5, lam=0.5, stop_grad_future=True)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.2416667, -0.2833333, -0.05]]))
    # Value loss: dL_V/dV_h = (2/3) * (V_h - G_h) = [-0.225, -0.5166667, -0.1]; no gradient to logprobs
    logp, ref, values, rewards, mask = hand_inputs()
    loss, _ = dqo_value_loss(values, logp, ref, rewards, mask, beta=0.5, lam=0.5)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[-0.225, -0.5166667, -0.1]]))
    assert logp.grad is None


# ----------------------------------------------------------------------------- naive reference


def naive_dqo(logp, ref, values, rewards, mask, beta, lam, stop_grad_future, weights=None, reduction="mean"):
    """Loop over sequences and valid tokens with the recursion as written in docs/dqo.md."""
    B, L = mask.shape
    v_total, p_total = 0.0, 0.0
    for b in range(B):
        idx = [t for t in range(L) if mask[b, t]]
        n = len(idx)
        l = [logp[b, t] - ref[b, t] for t in idx]
        V = [values[b, t] for t in idx]
        r = [0.0] * (n - 1) + [float(rewards[b])]

        def returns(lr, vs):
            G = [0.0] * (n + 1)  # G_n = 0
            for h in reversed(range(n)):
                v_next = vs[h + 1] if h + 1 < n else 0.0
                G[h] = r[h] - beta * lr[h] + (1 - lam) * v_next + lam * G[h + 1]
            return G

        V_sg = [v.detach() for v in V]
        G_sg = returns([x.detach() for x in l], V_sg)
        G_q = G_sg if stop_grad_future else returns(l, V_sg)
        v_seq = sum((V[h] - G_sg[h]) ** 2 for h in range(n))
        q_seq = sum((beta * l[h] + V_sg[h] - r[h] - G_q[h + 1]) ** 2 for h in range(n))
        if reduction == "mean":
            v_seq, q_seq = v_seq / n, q_seq / n
        w = 1.0 if weights is None else float(weights[b])
        v_total = v_total + v_seq
        p_total = p_total + w * q_seq
    return v_total / B, p_total / B


@pytest.mark.parametrize("seed,holes", [(0, False), (1, False), (2, True), (3, True)])
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("stop_grad_future", [False, True])
def test_matches_naive_loop(seed, holes, lam, stop_grad_future):
    logp, ref, values, rewards, mask = random_inputs(seed, holes=holes)
    weights = oreo_importance_weights(logp, ref, mask) if seed % 2 else None
    reduction = "sum" if seed == 3 else "mean"
    v_loss, p_loss, _ = dqo_losses(
        logp, ref, values, rewards, mask, beta=0.3, lam=lam, importance_weights=weights,
        stop_grad_future=stop_grad_future, token_reduction=reduction,
    )
    nv, np_ = naive_dqo(logp, ref, values, rewards, mask, 0.3, lam, stop_grad_future, weights, reduction)
    assert v_loss.item() == pytest.approx(nv.item(), rel=1e-10)
    assert p_loss.item() == pytest.approx(np_.item(), rel=1e-10)
    g = torch.autograd.grad(v_loss + p_loss, [logp, values])
    g_ref = torch.autograd.grad(nv + np_, [logp, values], allow_unused=True)
    for got, want in zip(g, g_ref):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert torch.isfinite(got).all()


def test_interior_holes_equal_compacted_rows():
    # A row [a, pad, b] must behave as [a, b, pad]: the next state of action a is the state before b.
    gen = torch.Generator().manual_seed(11)
    logp = -torch.rand(1, 3, generator=gen, dtype=torch.float64)
    ref = -torch.rand(1, 3, generator=gen, dtype=torch.float64)
    values = torch.randn(1, 3, generator=gen, dtype=torch.float64)
    R = torch.tensor([1.0], dtype=torch.float64)
    holey = torch.tensor([[True, False, True]])
    packed = torch.tensor([[True, True, False]])
    perm = [0, 2, 1]
    G_h = dqo_lambda_returns(logp, ref, values, R, holey, beta=0.3, lam=0.7)
    G_p = dqo_lambda_returns(logp[:, perm], ref[:, perm], values[:, perm], R, packed, beta=0.3, lam=0.7)
    torch.testing.assert_close(G_h[:, perm], G_p)
    assert G_h[0, 1].item() == 0.0


# ----------------------------------------------------------------------------- stop-gradient switch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stop_grad_future_gradient_only_from_own_residual(seed):
    logp, ref, values, rewards, mask = random_inputs(seed)
    beta, lam = 0.3, 0.8
    w = oreo_importance_weights(logp, ref, mask)
    loss, _ = dqo_policy_loss(
        logp, ref, values, rewards, mask, beta=beta, lam=lam, importance_weights=w, stop_grad_future=True
    )
    g_logp, g_values = torch.autograd.grad(loss, [logp, values], allow_unused=True)
    assert g_values is None or bool((g_values == 0).all())
    _, q_res = dqo_residuals(logp.detach(), ref, values.detach(), rewards, mask, beta=beta, lam=lam)
    counts = mask.sum(dim=1, keepdim=True).double()
    expected = torch.where(mask, 2 * beta * w.unsqueeze(1) * q_res / (counts * mask.shape[0]), torch.zeros_like(q_res))
    torch.testing.assert_close(g_logp, expected)
    # without the switch the future log-ratios do get gradient from earlier residuals
    loss_nsg, _ = dqo_policy_loss(logp, ref, values, rewards, mask, beta=beta, lam=lam, importance_weights=w)
    (g_nsg,) = torch.autograd.grad(loss_nsg, [logp])
    assert not torch.allclose(g_nsg, g_logp)


# ----------------------------------------------------------------------------- identity with OREO (docs/dqo.md)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_identity_with_oreo_token_level(seed):
    """lam = 1, no importance weights: the DQO residual equals OREO's token-level residual."""
    logp, ref, values, rewards, mask = random_inputs(seed, batch=6, length=9)
    beta = 0.03 + 0.1 * seed
    oreo_res = oreo_token_residuals(values, logp, ref, rewards, mask, beta=beta)
    v_res, q_res = dqo_residuals(logp, ref, values, rewards, mask, beta=beta, lam=1.0)
    torch.testing.assert_close(q_res, oreo_res, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_res, oreo_res, rtol=1e-12, atol=1e-12)

    # Value loss: identical to OREO's Eq. 8 in value and gradient (w.r.t. values; none to logprobs).
    dv, _ = dqo_value_loss(values, logp, ref, rewards, mask, beta=beta, lam=1.0)
    ov, _ = oreo_value_loss(values, logp, ref, rewards, mask, beta=beta)
    assert dv.item() == pytest.approx(ov.item(), rel=1e-12)
    g_dqo, g_oreo = torch.autograd.grad(dv, values)[0], torch.autograd.grad(ov, values)[0]
    torch.testing.assert_close(g_dqo, g_oreo, rtol=1e-12, atol=1e-14)

    # No stop-gradient switch (DQO as OREO App. C describes it): equals the OREO residual with no
    # stop-gradient on the future log-ratios (and the value detached), without the KL term.
    dq, _ = dqo_policy_loss(logp, ref, values, rewards, mask, beta=beta, lam=1.0, stop_grad_future=False)
    counts = mask.sum(dim=1).double()
    res_nosg = oreo_token_residuals(values.detach(), logp, ref, rewards, mask, beta=beta)
    oq_nosg = ((res_nosg**2).sum(dim=1) / counts).mean()
    assert dq.item() == pytest.approx(oq_nosg.item(), rel=1e-12)
    g_dqo, g_oreo = torch.autograd.grad(dq, logp)[0], torch.autograd.grad(oq_nosg, logp)[0]
    torch.testing.assert_close(g_dqo, g_oreo, rtol=1e-10, atol=1e-14)

    # With the switch on: equals oreo_policy_loss (Eq. 9, alpha = 0) in value and gradient.
    dq_sg, _ = dqo_policy_loss(logp, ref, values, rewards, mask, beta=beta, lam=1.0, stop_grad_future=True)
    oq, _ = oreo_policy_loss(logp, ref, values, rewards, mask, beta=beta, alpha=0.0)
    assert dq_sg.item() == pytest.approx(oq.item(), rel=1e-12)
    g_dqo, g_oreo = torch.autograd.grad(dq_sg, logp)[0], torch.autograd.grad(oq, logp)[0]
    torch.testing.assert_close(g_dqo, g_oreo, rtol=1e-10, atol=1e-14)


def test_identity_holds_with_importance_weights_too():
    logp, ref, values, rewards, mask = random_inputs(5)
    w = oreo_importance_weights(logp, ref, mask)
    dq, _ = dqo_policy_loss(
        logp, ref, values, rewards, mask, beta=0.2, lam=1.0, importance_weights=w, stop_grad_future=True
    )
    oq, _ = oreo_policy_loss(logp, ref, values, rewards, mask, beta=0.2, alpha=0.0, importance_weights=w)
    assert dq.item() == pytest.approx(oq.item(), rel=1e-12)


def test_identity_breaks_for_lambda_below_one():
    logp, ref, values, rewards, mask = random_inputs(6)
    oreo_res = oreo_token_residuals(values, logp, ref, rewards, mask, beta=0.3)
    _, q_res = dqo_residuals(logp, ref, values, rewards, mask, beta=0.3, lam=0.9)
    assert not torch.allclose(q_res, oreo_res)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_naming_argument():
    logp, ref, values, rewards, mask = hand_inputs()
    with pytest.raises(ValueError, match="values"):
        dqo_losses(logp, ref, values[:, :2], rewards, mask)
    with pytest.raises(ValueError, match="ref_logprobs"):
        dqo_losses(logp, ref[:, :2], values, rewards, mask)
    with pytest.raises(ValueError, match="rewards"):
        dqo_losses(logp, ref, values, torch.ones(2), mask)
    with pytest.raises(ValueError, match="importance_weights"):
        dqo_losses(logp, ref, values, rewards, mask, importance_weights=torch.ones(2))
    with pytest.raises(ValueError, match="lam"):
        dqo_losses(logp, ref, values, rewards, mask, lam=1.5)
    with pytest.raises(ValueError, match="token_reduction"):
        dqo_losses(logp, ref, values, rewards, mask, token_reduction="max")
    with pytest.raises(ValueError, match="mask"):
        dqo_value_loss(values, logp, ref, rewards, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        dqo_policy_loss(logp, ref, values, rewards, torch.zeros(1, 3))
