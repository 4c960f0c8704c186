"""DPO and DPO-Positive (docs/baselines.md rows DPO / DPO-Positive; docs/baselines.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_reason.losses.dpo import dpo_loss, sequence_logratios

NAN = float("nan")


def test_sequence_logratios_by_hand():
    logp = torch.tensor([[-1.0, -2.0, NAN], [-0.5, -0.5, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 4.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: 0.5 - 1 = -0.5 (padding ignored, even nan) ; row 1: 0.5 * 3 = 1.5
    r = sequence_logratios(logp, ref, mask)
    torch.testing.assert_close(r, torch.tensor([-0.5, 1.5]))
    r.sum().backward()
    torch.testing.assert_close(logp.grad, mask.float())


def test_sequence_logratios_matches_loop():
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        B, L = 6, 8
        lengths = torch.randint(1, L + 1, (B,), generator=gen)
        mask = torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)
        logp = -torch.rand(B, L, generator=gen, dtype=torch.float64)
        ref = -torch.rand(B, L, generator=gen, dtype=torch.float64)
        want = [sum(float(logp[b, t] - ref[b, t]) for t in range(L) if mask[b, t]) for b in range(B)]
        torch.testing.assert_close(sequence_logratios(logp, ref, mask), torch.tensor(want, dtype=torch.float64))


# beta = 0.1 ; r_w = [2, -1], r_l = [0, 1] -> margins r_w - r_l = [2, -2]
# DPO: loss = mean(-log sigmoid(0.2), -log sigmoid(-0.2)) = mean(softplus(-0.2), softplus(0.2))
#           = (0.5981389 + 0.7981389) / 2 = 0.6981389
# gradient dL/dr_w = -beta * sigmoid(-beta*margin) / P: pair 0 -0.1*sigmoid(-0.2)/2 = -0.0225083,
#                                                         pair 1 -0.1*sigmoid(0.2)/2 = -0.0274917


def test_dpo_by_hand():
    r_w = torch.tensor([2.0, -1.0], requires_grad=True)
    r_l = torch.tensor([0.0, 1.0], requires_grad=True)
    loss, m = dpo_loss(r_w, r_l, beta=0.1)
    assert loss.item() == pytest.approx(0.6981389, abs=1e-6)
    assert m["reward_accuracy"].item() == pytest.approx(0.5)
    assert m["margin"].item() == pytest.approx(0.0, abs=1e-7)  # mean(0.2, -0.2)
    assert m["chosen_reward"].item() == pytest.approx(0.05)  # 0.1 * (2 - 1) / 2
    assert m["rejected_reward"].item() == pytest.approx(0.05)  # 0.1 * (0 + 1) / 2
    assert m["positive_penalty"].item() == 0.0
    assert all(not t.requires_grad and t.dim() == 0 for t in m.values())
    loss.backward()
    torch.testing.assert_close(r_w.grad, torch.tensor([-0.0225083, -0.0274917]))
    torch.testing.assert_close(r_l.grad, -r_w.grad)


# DPO-Positive, lambda = 50: penalty max(0, ref_w - logp_w) = max(0, -r_w) = [0, 1]
# logits = [2 - 0, -2 - 50*1] = [2, -52] -> beta*logits = [0.2, -5.2]
# loss = (softplus(-0.2) + softplus(5.2)) / 2 = (0.5981389 + 5.2055014) / 2 = 2.9018201
# dL/dr_w (pair 1; penalty active, d logit/d r_w = 1 + lambda = 51):
#   -beta * 51 * sigmoid(5.2) / 2 = -0.1 * 51 * 0.9945137 / 2 = -2.5360099 ; pair 0 unchanged -0.0225083


def test_dpo_positive_by_hand():
    r_w = torch.tensor([2.0, -1.0], requires_grad=True)
    r_l = torch.tensor([0.0, 1.0])
    loss, m = dpo_loss(r_w, r_l, beta=0.1, dpo_positive_lambda=50.0)
    assert loss.item() == pytest.approx(2.9018201, abs=1e-6)
    assert m["positive_penalty"].item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(r_w.grad, torch.tensor([-0.0225083, -2.5360099]))


def test_dpo_positive_with_explicit_chosen_logprobs_is_the_same():
    # chosen_ref - chosen_logp = -r_w, so passing the summed log-probs must give the same loss
    logp_w = torch.tensor([-10.0, -12.0], requires_grad=True)
    ref_w = torch.tensor([-12.0, -11.0])
    r_w = logp_w - ref_w  # [2, -1]
    r_l = torch.tensor([0.0, 1.0])
    loss_a, _ = dpo_loss(
        r_w, r_l, beta=0.1, dpo_positive_lambda=50.0, chosen_logprobs=logp_w, chosen_ref_logprobs=ref_w
    )
    (g_a,) = torch.autograd.grad(loss_a, logp_w)
    loss_b, _ = dpo_loss(r_w, r_l, beta=0.1, dpo_positive_lambda=50.0)
    (g_b,) = torch.autograd.grad(loss_b, logp_w)
    assert loss_a.item() == pytest.approx(2.9018201, abs=1e-6)
    assert loss_b.item() == pytest.approx(loss_a.item(), abs=1e-7)
    torch.testing.assert_close(g_a, g_b)


def test_dpo_matches_loop_on_random_pairs():
    gen = torch.Generator().manual_seed(3)
    for lam in (0.0, 5.0):
        r_w = torch.randn(9, generator=gen, dtype=torch.float64)
        r_l = torch.randn(9, generator=gen, dtype=torch.float64)
        want = 0.0
        for a, b in zip(r_w.tolist(), r_l.tolist()):
            z = 0.2 * (a - b - lam * max(0.0, -a))
            want += math.log1p(math.exp(-z)) / 9
        loss, m = dpo_loss(r_w, r_l, beta=0.2, dpo_positive_lambda=lam)
        assert loss.item() == pytest.approx(want, rel=1e-12)
        assert m["reward_accuracy"].item() == pytest.approx(float((r_w > r_l).double().mean()))


def test_dpo_end_to_end_from_token_logprobs():
    # 2 pairs built from token log-probs; the DPO loss equals -logsigmoid of the summed margins
    logp = torch.tensor([[-1.0, -1.0], [-2.0, NAN], [-0.5, -0.5], [-3.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.5], [-1.0, 0.0], [-1.0, -1.0], [-1.0, -2.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    r = sequence_logratios(logp, ref, mask)  # [1, -1, 1, -1]
    loss, _ = dpo_loss(r[0::2], r[1::2], beta=0.1)
    # margins [2, 2] -> loss = softplus(-0.2) = 0.5981389
    assert loss.item() == pytest.approx(0.5981389, abs=1e-6)
    assert loss.item() == pytest.approx(-F.logsigmoid(torch.tensor(0.2)).item(), abs=1e-7)


def test_bad_input_raises_naming_argument():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ref_logprobs"):
        sequence_logratios(logp, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        sequence_logratios(logp, logp, torch.ones(3, 3))
    with pytest.raises(ValueError, match="mask"):
        sequence_logratios(logp, logp, torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="rejected_logratios"):
        dpo_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="chosen_logratios"):
        dpo_loss(torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="chosen_logratios"):
        dpo_loss(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="chosen_logprobs"):
        dpo_loss(
            torch.zeros(2), torch.zeros(2), dpo_positive_lambda=1.0,
            chosen_logprobs=torch.zeros(3), chosen_ref_logprobs=torch.zeros(3),
        )
    with pytest.raises(ValueError, match="chosen_ref_logprobs"):
        dpo_loss(torch.zeros(2), torch.zeros(2), dpo_positive_lambda=1.0, chosen_logprobs=torch.zeros(2))
    with pytest.raises(ValueError, match="dpo_positive_lambda"):
        dpo_loss(torch.zeros(2), torch.zeros(2), dpo_positive_lambda=-1.0)
