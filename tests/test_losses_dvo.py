"""DVO step log-ratios, loss and targets (docs/dvo.md)."""

from __future__ import annotations

import pytest
import torch

from lit_reason.losses.dvo import dvo_loss, step_logratios, targets_from_q, targets_from_values
from lit_reason.losses.vineppo import vineppo_step_advantages

NAN = float("nan")


def random_steps(batch: int, length: int, max_steps: int, gen: torch.Generator):
    """Right-padded ragged batch: per row T in [1, S] steps, each of >= 1 token, then padding."""
    step_ids = torch.full((batch, length), -1, dtype=torch.long)
    num_steps = torch.randint(1, max_steps + 1, (batch,), generator=gen)
    for b in range(batch):
        t = 0
        for k in range(int(num_steps[b])):
            n_tok = int(torch.randint(1, 4, (1,), generator=gen))
            step_ids[b, t : t + n_tok] = k
            t += n_tok
    return step_ids, num_steps


# ----------------------------------------------------------------------------- step_logratios


def test_step_logratios_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -0.25, NAN], [-1.0, -1.0, -1.0, NAN, NAN]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.25, NAN], [-2.0, -2.0, -3.0, NAN, NAN]])
    # l = logp - ref: row 0 -> [0.5, -1.0, 0.0, 1.0, pad] ; row 1 -> [1, 1, 2, pad, pad]
    step_ids = torch.tensor([[0, 0, 1, 1, -1], [0, 1, 1, -1, -1]])
    num_steps = torch.tensor([2, 2])
    out = step_logratios(logp, ref, step_ids, num_steps, max_steps=3)
    # row 0: L_0 = 0.5 - 1.0 = -0.5 ; L_1 = 0 + 1 = 1 ; L_2 = 0 (past T)
    # row 1: L_0 = 1 ; L_1 = 1 + 2 = 3 ; L_2 = 0
    torch.testing.assert_close(out, torch.tensor([[-0.5, 1.0, 0.0], [1.0, 3.0, 0.0]]))


def test_step_logratios_drops_steps_past_num_steps():
    logp = torch.tensor([[1.0, 2.0, 4.0]])
    ref = torch.zeros(1, 3)
    step_ids = torch.tensor([[0, 1, 2]])
    # T = 2: the tokens of step 2 are dropped and L_2 = 0
    out = step_logratios(logp, ref, step_ids, torch.tensor([2]), max_steps=3)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0, 0.0]]))


def test_step_logratios_matches_naive_loop():
    gen = torch.Generator().manual_seed(0)
    batch, length, max_steps = 7, 20, 5
    step_ids, num_steps = random_steps(batch, length, max_steps, gen)
    logp = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    ref = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    logp[step_ids < 0] = NAN  # garbage at padding must not leak
    out = step_logratios(logp, ref, step_ids, num_steps, max_steps)
    expected = torch.zeros(batch, max_steps, dtype=torch.float64)
    for b in range(batch):
        for t in range(length):
            k = int(step_ids[b, t])
            if 0 <= k < int(num_steps[b]):
                expected[b, k] += logp[b, t] - ref[b, t]
    torch.testing.assert_close(out, expected)


def test_step_logratios_gradient_only_to_logprobs():
    logp = torch.tensor([[-1.0, -2.0, -3.0, NAN]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, -1.0, NAN]], requires_grad=True)
    step_ids = torch.tensor([[0, 1, 1, -1]])
    out = step_logratios(logp, ref, step_ids, torch.tensor([2]), max_steps=2)
    (out * torch.tensor([[2.0, 3.0]])).sum().backward()
    # d/dlogp_t = weight of the token's step; 0 (not nan) at padding
    torch.testing.assert_close(logp.grad, torch.tensor([[2.0, 3.0, 3.0, 0.0]]))
    assert ref.grad is None  # the reference log-probs are constants


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ref_logprobs=torch.zeros(2, 3)), "`ref_logprobs`"),
        (dict(step_ids=torch.zeros(2, 4)), "integer"),
        (dict(step_ids=torch.full((2, 4), 3)), r"\[-1, 3\)"),
        (dict(num_steps=torch.tensor([0, 1])), "`num_steps`"),
        (dict(num_steps=torch.tensor([1, 4])), "`num_steps`"),
        (dict(num_steps=torch.tensor([1])), "`num_steps`"),
    ],
)
def test_step_logratios_validation(kwargs, match):
    args = dict(
        logprobs=torch.zeros(2, 4),
        ref_logprobs=torch.zeros(2, 4),
        step_ids=torch.zeros(2, 4, dtype=torch.long),
        num_steps=torch.tensor([1, 1]),
        max_steps=3,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        step_logratios(**args)


# ----------------------------------------------------------------------------- dvo_loss


def test_dvo_loss_by_hand():
    # row 0, T = 2: beta*L = [0.1, -0.2], targets [0.1, -0.3] -> sq errors [0, 0.01], mean 0.005
    # row 1, T = 3: beta*L = [0.2, 0, -0.1], targets [0, 0.5, 0] -> [0.04, 0.25, 0.01], mean 0.1
    # loss = (0.005 + 0.1) / 2 = 0.0525   (per-sequence mean over steps, then batch mean)
    L = torch.tensor([[1.0, -2.0, NAN], [2.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0.1, -0.3, NAN], [0.0, 0.5, 0.0]], dtype=torch.float64)
    num_steps = torch.tensor([2, 3])
    loss, metrics = dvo_loss(L, targets, num_steps, beta=0.1)
    assert loss.item() == pytest.approx(0.0525)
    assert metrics["mse"].item() == pytest.approx(0.0525)
    # implicit values over the 5 valid steps: (0.1 - 0.2 + 0.2 + 0 - 0.1) / 5 = 0
    assert metrics["implicit_value_mean"].item() == pytest.approx(0.0, abs=1e-12)
    # targets: (0.1 - 0.3 + 0 + 0.5 + 0) / 5 = 0.06
    assert metrics["target_mean"].item() == pytest.approx(0.06)
    assert all(not m.requires_grad and m.dim() == 0 for m in metrics.values())

    loss.backward()
    # dloss/dL_bk = (1/B) (1/T_b) 2 (beta L - target) beta
    # row 0: 0.5 * 0.5 * 2 * [0, 0.1] * 0.1 = [0, 0.005] ; padding 0
    # row 1: 0.5 * (1/3) * 2 * [0.2, -0.5, -0.1] * 0.1
    expected = torch.tensor(
        [[0.0, 0.005, 0.0], [0.02 / 3, -0.05 / 3, -0.01 / 3]], dtype=torch.float64
    )
    torch.testing.assert_close(L.grad, expected)


def test_dvo_loss_is_zero_at_the_optimum():
    targets = torch.tensor([[0.3, -0.2, 0.7]])
    loss, _ = dvo_loss(targets / 0.1, targets, torch.tensor([3]), beta=0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_dvo_loss_matches_naive_loop():
    gen = torch.Generator().manual_seed(1)
    batch, max_steps, beta = 6, 5, 0.3
    L = torch.randn(batch, max_steps, generator=gen, dtype=torch.float64)
    targets = torch.randn(batch, max_steps, generator=gen, dtype=torch.float64)
    num_steps = torch.randint(1, max_steps + 1, (batch,), generator=gen)
    loss, _ = dvo_loss(L, targets, num_steps, beta=beta)
    per_seq = []
    for b in range(batch):
        T = int(num_steps[b])
        per_seq.append(sum((beta * L[b, k] - targets[b, k]) ** 2 for k in range(T)) / T)
    assert loss.item() == pytest.approx(float(sum(per_seq) / batch))


def test_gradient_flows_only_through_step_logratios():
    gen = torch.Generator().manual_seed(2)
    batch, length, max_steps = 4, 12, 4
    step_ids, num_steps = random_steps(batch, length, max_steps, gen)
    logp = torch.randn(batch, length, generator=gen, requires_grad=True)
    ref = torch.randn(batch, length, generator=gen, requires_grad=True)
    q_path = torch.randn(batch, max_steps + 1, generator=gen, requires_grad=True)
    targets = targets_from_q(q_path, num_steps)
    assert not targets.requires_grad
    step_targets = torch.randn(batch, max_steps, generator=gen, requires_grad=True)
    loss, _ = dvo_loss(step_logratios(logp, ref, step_ids, num_steps, max_steps), step_targets, num_steps)
    loss.backward()
    assert logp.grad is not None and bool((logp.grad[step_ids >= 0] != 0).all())
    assert bool((logp.grad[step_ids < 0] == 0).all())
    assert ref.grad is None
    assert step_targets.grad is None  # the targets are constants


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step_targets=torch.zeros(2, 2)), "`step_targets`"),
        (dict(step_logratios=torch.zeros(2)), "`step_logratios`"),
        (dict(num_steps=torch.tensor([1, 4])), "`num_steps`"),
        (dict(num_steps=torch.tensor([1.0, 2.0])), "integer"),
    ],
)
def test_dvo_loss_validation(kwargs, match):
    args = dict(step_logratios=torch.zeros(2, 3), step_targets=torch.zeros(2, 3), num_steps=torch.tensor([1, 3]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dvo_loss(**args)


# ----------------------------------------------------------------------------- targets


def test_targets_from_q_by_hand():
    # Path of T = 3 steps: Q(root) = 0.2, Q(node_1) = 0.5, Q(node_2) = -0.25, terminal Q = +1.
    # Step k leads from node k to node k+1: targets [0.3, -0.75, 1.25]; sum = 1 - 0.2 = 0.8.
    # Row 1: T = 1, root Q = -0.4, terminal -1 -> [-0.6, 0, 0]; the entries after T are ignored.
    q_path = torch.tensor([[0.2, 0.5, -0.25, 1.0], [-0.4, -1.0, NAN, NAN]])
    out = targets_from_q(q_path, torch.tensor([3, 1]))
    torch.testing.assert_close(out, torch.tensor([[0.3, -0.75, 1.25], [-0.6, 0.0, 0.0]]))


def test_targets_from_q_telescopes_and_matches_loop():
    gen = torch.Generator().manual_seed(3)
    batch, max_steps = 9, 6
    num_steps = torch.randint(1, max_steps + 1, (batch,), generator=gen)
    q_path = torch.rand(batch, max_steps + 1, generator=gen, dtype=torch.float64) * 2 - 1
    rewards = torch.where(torch.rand(batch, generator=gen) < 0.5, -1.0, 1.0).double()
    for b in range(batch):
        T = int(num_steps[b])
        q_path[b, T] = rewards[b]  # the terminal node's Q is its reward
        q_path[b, T + 1 :] = NAN
    out = targets_from_q(q_path, num_steps)
    torch.testing.assert_close(out.sum(dim=1), rewards - q_path[:, 0])
    expected = torch.zeros(batch, max_steps, dtype=torch.float64)
    for b in range(batch):
        for k in range(int(num_steps[b])):
            expected[b, k] = q_path[b, k + 1] - q_path[b, k]
    torch.testing.assert_close(out, expected)


def test_targets_from_values_by_hand():
    # V(S_0..S_2) = [0.5, 0.25, 0.75], R = 1, V(S_3) = R -> [-0.25, 0.5, 0.25]; sum = 1 - 0.5
    # Row 1: T = 2, V = [0.4, 0.9], R = 0 -> [0.5, -0.9, 0]
    values = torch.tensor([[0.5, 0.25, 0.75], [0.4, 0.9, NAN]])
    out = targets_from_values(values, torch.tensor([1.0, 0.0]), torch.tensor([3, 2]))
    torch.testing.assert_close(out, torch.tensor([[-0.25, 0.5, 0.25], [0.5, -0.9, 0.0]]))


def test_targets_from_values_telescopes_and_equals_vineppo_bookkeeping():
    gen = torch.Generator().manual_seed(4)
    batch, max_steps = 9, 6
    num_steps = torch.randint(1, max_steps + 1, (batch,), generator=gen)
    values = torch.rand(batch, max_steps, generator=gen, dtype=torch.float64)
    rewards = (torch.rand(batch, generator=gen) < 0.5).double()
    out = targets_from_values(values, rewards, num_steps)
    torch.testing.assert_close(out.sum(dim=1), rewards - values[:, 0])
    expected = torch.zeros(batch, max_steps, dtype=torch.float64)
    for b in range(batch):
        T = int(num_steps[b])
        path = [float(values[b, k]) for k in range(T)] + [float(rewards[b])]
        for k in range(T):
            expected[b, k] = path[k + 1] - path[k]
    torch.testing.assert_close(out, expected)
    # V(S_T) = R with r = 0 is the same as VinePPO's V(S_T) = 0 with r_{T-1} = R.
    torch.testing.assert_close(out, vineppo_step_advantages(values, num_steps, rewards))


def test_target_validation():
    with pytest.raises(ValueError, match="`q_path`"):
        targets_from_q(torch.zeros(2, 1), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="`num_steps`"):
        targets_from_q(torch.zeros(2, 3), torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="`rewards`"):
        targets_from_values(torch.zeros(2, 3), torch.zeros(3), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="`step_values`"):
        targets_from_values(torch.zeros(3), torch.zeros(3), torch.tensor([1, 1, 1]))
