"""VinePPO advantages (docs/vineppo.md), global whitening and step broadcasting."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_reason.losses import (
    broadcast_sequence_values,
    broadcast_step_values,
    fill_values_backward,
    masked_whiten,
    value_estimation_mask,
    vineppo_step_advantages,
    vineppo_token_advantages,
)


def ragged_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    return torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)


def naive_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Reference: gather the valid entries, use torch's unbiased var, scatter back."""
    vals = [x[b, t].item() for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    v = torch.tensor(vals, dtype=torch.float64)
    mean, var = v.mean(), v.var(unbiased=True)
    out = torch.zeros_like(x, dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                out[b, t] = (x[b, t] - mean) / torch.sqrt(var + eps)
    return out


# ----------------------------------------------------------------------------- masked_whiten


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2 ; unbiased var = ((1-2)^2 + 0 + (3-2)^2) / (3 - 1) = 1 -> (x - 2) / sqrt(1 + 1e-8)
    out = masked_whiten(x, mask)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    # shift_mean=False restores the mean: (x - 2)/1 + 2 = x
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


def test_masked_whiten_uses_unbiased_variance():
    x = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    # mean 1, biased var 1, unbiased var 2 -> (x - 1) / sqrt(2) = -+0.707107
    out = masked_whiten(x, torch.ones(1, 2))
    expected = torch.tensor([[-0.7071067811865476, 0.7071067811865476]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, atol=1e-8, rtol=1e-8)


def test_masked_whiten_single_token_is_zero():
    out = masked_whiten(torch.tensor([[5.0, 7.0]]), torch.tensor([[0, 1]]))
    torch.testing.assert_close(out, torch.zeros(1, 2))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_masked_whiten_matches_naive(seed):
    gen = torch.Generator().manual_seed(seed)
    x = 3.0 * torch.randn(5, 8, generator=gen, dtype=torch.float64) + 1.5
    mask = ragged_mask(5, 8, gen)
    torch.testing.assert_close(masked_whiten(x, mask), naive_whiten(x, mask), atol=1e-10, rtol=1e-10)


def test_masked_whiten_float32_and_float_mask():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, generator=gen)
    mask = ragged_mask(3, 5, gen)
    out = masked_whiten(x, mask.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive_whiten(x, mask), atol=1e-5, rtol=1e-5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_inputs(rank: int):
    """Different batch sizes and lengths per rank (the concatenation is over valid tokens)."""
    gen = torch.Generator().manual_seed(100 + rank)
    batch, length = (3, 6) if rank == 0 else (2, 9)
    x = 2.0 * torch.randn(batch, length, generator=gen, dtype=torch.float64) - 0.5
    mask = ragged_mask(batch, length, gen)
    # vineppo inputs
    max_steps = 4
    num_steps = torch.randint(1, max_steps + 1, (batch,), generator=gen)
    step_values = torch.rand(batch, max_steps, generator=gen, dtype=torch.float64)
    rewards = torch.randint(0, 2, (batch,), generator=gen).double()
    step_ids = torch.full((batch, length), -1, dtype=torch.long)
    for b in range(batch):
        n = int(mask[b].sum())
        # monotone step assignment over the valid tokens, last token in the last step
        ids = torch.clamp(torch.arange(n) * int(num_steps[b]) // max(n, 1), max=int(num_steps[b]) - 1)
        step_ids[b, :n] = ids
    return x, mask, step_values, num_steps, rewards, step_ids


def _whiten_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    try:
        x, mask, step_values, num_steps, rewards, step_ids = _rank_inputs(rank)
        out = {
            "global": masked_whiten(x, mask),
            "local": masked_whiten(x, mask, distributed=False),
            "vine": vineppo_token_advantages(step_values, num_steps, rewards, step_ids, mask),
        }
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_masked_whiten_two_processes_equals_concatenation(tmp_path):
    world, port = 2, _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_whiten_worker, args=(r, world, port, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail("distributed whitening worker hung")
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    inputs = [_rank_inputs(r) for r in range(world)]

    # whitening the concatenation of all valid tokens of both ranks
    flat_x = torch.cat([x[m] for x, m, *_ in inputs])
    flat_global = torch.cat([res["global"][inp[1]] for res, inp in zip(results, inputs)])
    expected = (flat_x - flat_x.mean()) / torch.sqrt(flat_x.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(flat_global, expected, atol=1e-10, rtol=1e-10)
    for res, (x, mask, *_) in zip(results, inputs):
        assert torch.all(res["global"][~mask] == 0)
        torch.testing.assert_close(res["local"], naive_whiten(x, mask), atol=1e-10, rtol=1e-10)
    # the two ranks' local statistics differ, so global != local (the test has teeth)
    assert not torch.allclose(results[0]["global"], results[0]["local"])

    # vineppo_token_advantages whitens over the global batch too
    raw = [
        vineppo_token_advantages(sv, ns, r, si, m, whiten=False) for _, m, sv, ns, r, si in inputs
    ]
    flat_raw = torch.cat([a[inp[1]] for a, inp in zip(raw, inputs)])
    exp_vine = (flat_raw - flat_raw.mean()) / torch.sqrt(flat_raw.var(unbiased=True) + 1e-8)
    flat_vine = torch.cat([res["vine"][inp[1]] for res, inp in zip(results, inputs)])
    torch.testing.assert_close(flat_vine, exp_vine, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- broadcasting


def test_broadcast_step_values_by_hand():
    step_values = torch.tensor([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])
    step_ids = torch.tensor([[0, 0, 1, 2, 2, -1], [0, 1, 1, -1, -1, -1]])
    expected = torch.tensor([[10.0, 10.0, 20.0, 30.0, 30.0, 0.0], [1.0, 2.0, 2.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(broadcast_step_values(step_values, step_ids), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_broadcast_step_values_matches_naive(seed):
    gen = torch.Generator().manual_seed(seed)
    step_values = torch.randn(4, 5, generator=gen)
    step_ids = torch.randint(-1, 5, (4, 11), generator=gen)
    out = broadcast_step_values(step_values, step_ids)
    ref = torch.zeros(4, 11)
    for b in range(4):
        for t in range(11):
            if step_ids[b, t] >= 0:
                ref[b, t] = step_values[b, step_ids[b, t]]
    torch.testing.assert_close(out, ref)


def test_broadcast_step_values_bad_inputs():
    with pytest.raises(ValueError, match="step_ids"):
        broadcast_step_values(torch.zeros(2, 3), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="step_ids"):
        broadcast_step_values(torch.zeros(2, 3), torch.full((2, 4), 3))
    with pytest.raises(ValueError, match="step_ids"):
        broadcast_step_values(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="step_values"):
        broadcast_step_values(torch.zeros(2), torch.zeros(2, 4, dtype=torch.long))


def test_broadcast_sequence_values():
    out = broadcast_sequence_values(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="values"):
        broadcast_sequence_values(torch.zeros(3), torch.ones(2, 3))


# ----------------------------------------------------------------------------- step advantages


def test_vineppo_step_advantages_by_hand():
    step_values = torch.tensor([[0.5, 0.7, 0.4], [0.3, 0.9, 99.0]])
    num_steps = torch.tensor([3, 2])
    rewards = torch.tensor([1.0, 0.0])
    adv = vineppo_step_advantages(step_values, num_steps, rewards)
    # row 0 (T=3, R=1): A0 = 0.7-0.5 = 0.2 ; A1 = 0.4-0.7 = -0.3 ; A2 = R - V2 = 1-0.4 = 0.6
    # row 1 (T=2, R=0): A0 = 0.9-0.3 = 0.6 ; A1 = 0-0.9 = -0.9 ; k=2 >= T -> 0 (99 ignored)
    torch.testing.assert_close(adv, torch.tensor([[0.2, -0.3, 0.6], [0.6, -0.9, 0.0]]))


def test_vineppo_single_step():
    # T = 1: A_0 = R - V(S_0), the RLOO-like initial-state baseline
    adv = vineppo_step_advantages(torch.tensor([[0.25, 5.0]]), torch.tensor([1]), torch.tensor([1.0]))
    torch.testing.assert_close(adv, torch.tensor([[0.75, 0.0]]))


def _naive_step_adv(step_values, num_steps, rewards):
    batch, max_steps = step_values.shape
    out = torch.zeros(batch, max_steps, dtype=torch.float64)
    for b in range(batch):
        T = int(num_steps[b])
        for k in range(T):
            r_k = float(rewards[b]) if k == T - 1 else 0.0
            v_next = float(step_values[b, k + 1]) if k + 1 < T else 0.0
            out[b, k] = r_k + v_next - float(step_values[b, k])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_vineppo_step_advantages_matches_naive(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, max_steps = 7, 6
    num_steps = torch.randint(1, max_steps + 1, (batch,), generator=gen)
    step_values = torch.rand(batch, max_steps, generator=gen, dtype=torch.float64)
    rewards = torch.randint(0, 2, (batch,), generator=gen).double() * 2 - 1  # {-1, +1}
    out = vineppo_step_advantages(step_values, num_steps, rewards)
    torch.testing.assert_close(out, _naive_step_adv(step_values, num_steps, rewards), atol=1e-12, rtol=1e-12)
    # telescoping: sum_k A_k = R - V(S_0)
    torch.testing.assert_close(out.sum(1), rewards - step_values[:, 0], atol=1e-12, rtol=1e-12)


def test_vineppo_step_advantages_bad_inputs():
    with pytest.raises(ValueError, match="num_steps"):
        vineppo_step_advantages(torch.zeros(2, 3), torch.tensor([1, 2, 3]), torch.zeros(2))
    with pytest.raises(ValueError, match="rewards"):
        vineppo_step_advantages(torch.zeros(2, 3), torch.tensor([1, 2]), torch.zeros(3))
    with pytest.raises(ValueError, match="num_steps"):
        vineppo_step_advantages(torch.zeros(2, 3), torch.tensor([0, 2]), torch.zeros(2))
    with pytest.raises(ValueError, match="num_steps"):
        vineppo_step_advantages(torch.zeros(2, 3), torch.tensor([4, 2]), torch.zeros(2))
    with pytest.raises(ValueError, match="step_values"):
        vineppo_step_advantages(torch.zeros(2), torch.tensor([1, 2]), torch.zeros(2))


# ----------------------------------------------------------------------------- backward fill


def test_fill_values_backward_by_hand():
    step_values = torch.tensor([[0.5, 0.7, -9.0, -9.0], [0.5, -9.0, 0.4, 0.0], [0.3, -9.0, -9.0, -9.0]])
    estimated = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    num_steps = torch.tensor([4, 3, 2])
    rewards = torch.tensor([1.0, 1.0, 0.0])
    out = fill_values_backward(step_values, estimated, num_steps, rewards)
    # row 0 (M=2, T=4, R=1): V3 = r3 + V(S_4) = 1 + 0 = 1 ; V2 = r2 + V3 = 0 + 1 = 1
    # row 1 (interior gap, T=3): V1 = r1 + V2 = 0 + 0.4 = 0.4 ; k=3 >= T -> 0
    # row 2 (T=2, R=0): V1 = 0 + 0 = 0 ; k >= 2 -> 0
    expected = torch.tensor([[0.5, 0.7, 1.0, 1.0], [0.5, 0.4, 0.4, 0.0], [0.3, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)
    # the advantages of filled states are 0, and A_{M-1} = R - V(S_{M-1})
    adv = vineppo_step_advantages(out, num_steps, rewards)
    # row 0: A0 = 0.2, A1 = 1 - 0.7 = 0.3, A2 = 1 - 1 = 0, A3 = R - V3 = 0
    torch.testing.assert_close(adv[0], torch.tensor([0.2, 0.3, 0.0, 0.0]))


def test_value_estimation_mask():
    num_steps = torch.tensor([1, 3, 5])
    m = value_estimation_mask(num_steps, 5, max_step_for_value_estimation=2)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(m, expected)
    m_all = value_estimation_mask(num_steps, 5)
    assert torch.equal(m_all.sum(1), num_steps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fill_values_backward_matches_naive(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, max_steps = 6, 7
    num_steps = torch.randint(1, max_steps + 1, (batch,), generator=gen)
    step_values = torch.rand(batch, max_steps, generator=gen, dtype=torch.float64)
    rewards = torch.randint(0, 2, (batch,), generator=gen).double()
    estimated = torch.rand(batch, max_steps, generator=gen) < 0.5
    out = fill_values_backward(step_values, estimated, num_steps, rewards)
    ref = torch.zeros(batch, max_steps, dtype=torch.float64)
    for b in range(batch):
        T = int(num_steps[b])
        v_next = 0.0
        for k in range(T - 1, -1, -1):
            r_k = float(rewards[b]) if k == T - 1 else 0.0
            v = float(step_values[b, k]) if estimated[b, k] else r_k + v_next
            ref[b, k] = v
            v_next = v
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- token advantages


def _token_example():
    step_values = torch.tensor([[0.5, 0.7, 0.4], [0.3, 0.9, 0.0]], dtype=torch.float64)
    num_steps = torch.tensor([3, 2])
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    step_ids = torch.tensor([[0, 0, 1, 2, 2, -1], [0, 1, 1, -1, -1, -1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    return step_values, num_steps, rewards, step_ids, mask


def test_vineppo_token_advantages_by_hand():
    step_values, num_steps, rewards, step_ids, mask = _token_example()
    raw = vineppo_token_advantages(step_values, num_steps, rewards, step_ids, mask, whiten=False)
    # step advantages: row 0 [0.2, -0.3, 0.6], row 1 [0.6, -0.9]; each token takes its step's
    torch.testing.assert_close(
        raw, torch.tensor([[0.2, 0.2, -0.3, 0.6, 0.6, 0.0], [0.6, -0.9, -0.9, 0.0, 0.0, 0.0]], dtype=torch.float64)
    )
    out = vineppo_token_advantages(step_values, num_steps, rewards, step_ids, mask)
    # 8 valid tokens: 0.2, 0.2, -0.3, 0.6, 0.6, 0.6, -0.9, -0.9 ; mean = 0.1/8 = 0.0125
    # sum of squared deviations = 2.86875 ; unbiased var = 2.86875/7 = 0.409821 ; std = 0.640173
    # (0.2-0.0125)/0.640173 = 0.292890 ; (-0.3-0.0125)/.. = -0.488149 ; (0.6-0.0125)/.. = 0.917721 ;
    # (-0.9-0.0125)/.. = -1.425396
    expected = torch.tensor(
        [[0.292890, 0.292890, -0.488149, 0.917721, 0.917721, 0.0], [0.917721, -1.425396, -1.425396, 0.0, 0.0, 0.0]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vineppo_token_advantages_matches_naive(seed):
    x, mask, step_values, num_steps, rewards, step_ids = _rank_inputs(seed + 10)
    out = vineppo_token_advantages(step_values, num_steps, rewards, step_ids, mask)
    step_adv = _naive_step_adv(step_values, num_steps, rewards)
    raw = torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                raw[b, t] = step_adv[b, step_ids[b, t]]
    torch.testing.assert_close(out, naive_whiten(raw, mask), atol=1e-10, rtol=1e-10)


def test_vineppo_token_advantages_bad_inputs():
    step_values, num_steps, rewards, step_ids, mask = _token_example()
    with pytest.raises(ValueError, match="mask"):
        vineppo_token_advantages(step_values, num_steps, rewards, step_ids, mask[:, :4])
    bad = step_ids.clone()
    bad[0, 1] = -1  # a valid token without a step
    with pytest.raises(ValueError, match="step_ids"):
        vineppo_token_advantages(step_values, num_steps, rewards, bad, mask)
    bad = step_ids.clone()
    bad[1, 2] = 2  # row 1 has T = 2
    with pytest.raises(ValueError, match="num_steps"):
        vineppo_token_advantages(step_values, num_steps, rewards, bad, mask)
