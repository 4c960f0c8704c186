"""Tests for lit_reason.metrics: calibration sums, ranking accuracies, reliability PNG."""

from __future__ import annotations

import itertools
import json
import math
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from lit_reason.metrics import (
    CalibrationStats,
    RankStats,
    best_of_k_accuracy,
    pairwise_outcome_accuracy,
    plot_reliability,
    rank_accuracy,
)

CAL_KEYS = {"mae_vs_mc", "ece", "ece_vs_mc", "brier", "brier_vs_mc", "explained_var", "count"}


def approx(x, rel=1e-9, abs=1e-12):  # noqa: A002 - mirrors pytest.approx
    return pytest.approx(x, rel=rel, abs=abs, nan_ok=True)


# ------------------------------------------------------------------------------------------------
# naive references (explicit Python loops over states / groups / pairs)
# ------------------------------------------------------------------------------------------------


def naive_calibration(pred, mc, outcome, n_bins=10, scale=1.0, shift=0.0):
    p = [min(max(scale * float(x) + shift, 0.0), 1.0) for x in pred]
    mc = [float(x) for x in mc]
    n = len(p)
    out = {"count": float(n), "mae_vs_mc": sum(abs(a - b) for a, b in zip(p, mc)) / n}
    out["brier_vs_mc"] = sum((a - b) ** 2 for a, b in zip(p, mc)) / n
    bins = [min(int(math.floor(x * n_bins)), n_bins - 1) for x in p]

    def ece(target):
        total = 0.0
        for b in range(n_bins):
            idx = [i for i in range(n) if bins[i] == b]
            if idx:
                mp = sum(p[i] for i in idx) / len(idx)
                mt = sum(target[i] for i in idx) / len(idx)
                total += len(idx) / n * abs(mp - mt)
        return total

    out["ece_vs_mc"] = ece(mc)
    if outcome is not None:
        y = [float(x) for x in outcome]
        out["ece"] = ece(y)
        out["brier"] = sum((a - b) ** 2 for a, b in zip(p, y)) / n
    else:
        out["ece"], out["brier"] = out["ece_vs_mc"], out["brier_vs_mc"]
    mean_mc = sum(mc) / n
    var_mc = sum((x - mean_mc) ** 2 for x in mc) / n
    d = [a - b for a, b in zip(mc, p)]
    mean_d = sum(d) / n
    var_d = sum((x - mean_d) ** 2 for x in d) / n
    out["explained_var"] = 0.0 if var_mc <= 1e-12 else 1 - var_d / var_mc
    return out


def naive_rank(pred, truth, mask):
    correct, pairs = 0.0, 0
    for g in range(pred.shape[0]):
        for i, j in itertools.combinations(range(pred.shape[1]), 2):
            if not (mask[g, i] and mask[g, j]):
                continue
            dt = float(truth[g, i]) - float(truth[g, j])
            dp = float(pred[g, i]) - float(pred[g, j])
            if dt == 0:
                continue
            pairs += 1
            correct += 0.5 if dp == 0 else float(dt * dp > 0)
    return correct, pairs


def naive_pairwise_outcome(values, outcomes, groups):
    correct, pairs = 0.0, 0
    for i in range(len(values)):
        for j in range(len(values)):
            if groups[i] == groups[j] and outcomes[i] == 1 and outcomes[j] == 0:
                pairs += 1
                vi, vj = float(values[i]), float(values[j])
                correct += 1.0 if vi > vj else 0.5 if vi == vj else 0.0
    return correct, pairs


def make_data(seed: int, n: int = 600):
    """Random probe states with discretised MC (k/8) and predictions spanning every bin."""
    g = torch.Generator().manual_seed(seed)
    mc = torch.randint(0, 9, (n,), generator=g).double() / 8
    pred = (mc + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(-0.2, 1.2)
    outcome = (torch.rand(n, generator=g, dtype=torch.float64) < mc).long()
    steps = torch.randint(0, 40, (n,), generator=g)
    rank_pred = torch.randint(0, 4, (30, 5), generator=g).float()  # few levels: many pred ties
    rank_truth = torch.randint(0, 3, (30, 5), generator=g).double() / 2
    rank_mask = torch.rand(30, 5, generator=g) < 0.8
    return pred, mc, outcome, steps, rank_pred, rank_truth, rank_mask


# ------------------------------------------------------------------------------------------------
# hand-computed values
# ------------------------------------------------------------------------------------------------


def test_hand_computed_calibration():
    # float64 inputs so the hand arithmetic is not blurred by float32 rounding of 0.12 etc.
    pred = torch.tensor([0.12, 0.18, 0.65, 0.95], dtype=torch.float64)
    mc = torch.tensor([0.0, 0.5, 1.0, 0.5], dtype=torch.float64)
    outcome = torch.tensor([0, 1, 1, 0])
    stats = CalibrationStats()
    stats.update(pred, mc, outcome, step_index=torch.tensor([0, 1, 1, 40]))
    m = stats.compute()
    assert set(m) == CAL_KEYS
    # |p-mc| = .12, .32, .35, .45 -> 1.24 / 4
    assert m["mae_vs_mc"] == approx(0.31)
    # bins: {.12, .18} -> bin 1, .65 -> bin 6, .95 -> bin 9
    # vs outcome: |.30 - 1| + |.65 - 1| + |.95 - 0| = .7 + .35 + .95 = 2.0 -> 2.0 / 4
    assert m["ece"] == approx(0.5)
    # vs mc: |.30 - .5| + |.65 - 1| + |.95 - .5| = .2 + .35 + .45 = 1.0 -> 1.0 / 4
    assert m["ece_vs_mc"] == approx(0.25)
    # (p-y)^2 = .0144 + .6724 + .1225 + .9025 = 1.7118 -> / 4
    assert m["brier"] == approx(0.42795)
    # (p-mc)^2 = .0144 + .1024 + .1225 + .2025 = .4418 -> / 4
    assert m["brier_vs_mc"] == approx(0.11045)
    # d = mc - p = [-.12, .32, .35, -.45]: mean .025, E[d^2] = .11045 -> Var(d) = .109825
    # mc: mean .5, Var(mc) = (.25 + 0 + .25 + 0) / 4 = .125 -> EV = 1 - .109825 / .125 = .1214
    assert m["explained_var"] == approx(0.1214)
    assert m["count"] == 4

    row = stats.reliability_table()[1]
    assert (row["bin_lo"], row["bin_hi"], row["count"]) == (approx(0.1), approx(0.2), 2)
    assert row["mean_pred"] == approx(0.15)
    assert row["frac_positive"] == approx(0.5)
    assert row["mean_mc"] == approx(0.25)
    empty = stats.reliability_table()[0]
    assert empty["count"] == 0 and math.isnan(empty["mean_pred"]) and math.isnan(empty["frac_positive"])

    # step 0: .12; step 1: (.32 + .35) / 2; step 40 is clamped into the last bucket (31): .45
    assert stats.mae_by_step() == {0: approx(0.12), 1: approx(0.335), 31: approx(0.45)}


def test_pred_to_prob_signed_and_clipping():
    # {-1, +1}-scale values: p = clamp(.5 * pred + .5, 0, 1) -> [0, 1, .6, 1 (3.0 clipped)]
    pred = torch.tensor([-1.0, 1.0, 0.2, 3.0], dtype=torch.float64)
    mc = torch.tensor([0.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    stats = CalibrationStats(pred_to_prob="signed")
    stats.update(pred, mc)
    m = stats.compute()
    # |p - mc| = 0 + 0 + .1 + .5 (clipped: 1 - .5, not 2 - .5) -> .6 / 4
    assert m["mae_vs_mc"] == approx(0.15)
    assert stats.clip_fraction() == approx(0.25)
    # no outcome given anywhere: ece/brier fall back to MC
    assert m["ece"] == m["ece_vs_mc"] and m["brier"] == m["brier_vs_mc"]
    # same numbers through an explicit (scale, shift)
    explicit = CalibrationStats(pred_to_prob=(0.5, 0.5))
    explicit.update(pred, mc)
    assert explicit.compute() == m


def test_explained_variance_edge_cases():
    perfect = CalibrationStats()
    mc = torch.tensor([0.0, 0.25, 0.5, 1.0])
    perfect.update(mc.clone(), mc)
    m = perfect.compute()
    assert m["explained_var"] == approx(1.0) and m["mae_vs_mc"] == 0.0 and m["ece_vs_mc"] == approx(0.0)

    # constant MC targets: Var(mc) == 0 -> documented 0.0, not NaN / -inf; 0.3 is not exact in
    # binary so the sum-based variance is a rounding residue, which must also count as zero.
    const = CalibrationStats()
    const.update(torch.rand(1000, generator=torch.Generator().manual_seed(0)), torch.full((1000,), 0.3))
    assert const.compute()["explained_var"] == 0.0

    # a constant offset explains all the variance: Var(mc - p) = 0
    shifted = CalibrationStats()
    shifted.update(mc * 0.5 + 0.2, mc * 0.5)
    assert shifted.compute()["explained_var"] == approx(1.0)


def test_rank_accuracy_hand_computed_with_ties_and_mask():
    nan = float("nan")
    pred = torch.tensor([[0.1, 0.3, 0.2, nan], [0.5, 0.5, 0.5, 0.9]])
    truth = torch.tensor([[0.0, 0.5, 1.0, 0.7], [1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    # group 0: (0,1) t-,p- ok; (0,2) t-,p- ok; (1,2) t-,p+ wrong -> 2 of 3 (slot 3 padded, NaN ok)
    # group 1: (0,1) truth tie -> excluded; (0,2), (1,2) pred ties -> 0.5 each -> 1 of 2
    #          (masked slot 3 would add two wrongly-ordered pairs if it were counted)
    # global: (2 + 1) / (3 + 2) = 0.6  (a mean of per-group fractions would give (2/3 + 1/2)/2)
    acc, pairs = rank_accuracy(pred, truth, mask)
    assert (acc, pairs) == (approx(0.6), 5)

    # constant predictions are chance, not 0
    acc, pairs = rank_accuracy(torch.zeros(2, 4), truth.nan_to_num(0.0), mask)
    assert acc == approx(0.5)

    # no informative pair: nan with pairs == 0 (documented), RankStats refuses to compute
    acc, pairs = rank_accuracy(torch.rand(3, 2), torch.ones(3, 2))
    assert pairs == 0 and math.isnan(acc)
    with pytest.raises(ValueError, match="no informative pairs"):
        RankStats().compute()

    # folded into CalibrationStats: rank_acc appears only once a pair was seen
    stats = CalibrationStats()
    stats.update(torch.tensor([0.5]), torch.tensor([0.5]))
    assert "rank_acc" not in stats.compute()
    stats.update_rank(pred, truth, mask)
    assert stats.compute()["rank_acc"] == approx(0.6)


def test_pairwise_outcome_accuracy_hand_computed():
    # prompt 7 (interleaved, unsorted ids): correct .4 vs incorrect .6 (wrong) and .2 (right)
    values = torch.tensor([0.9, 0.4, 0.2, 0.5, 0.6, 0.5, 0.7, 0.1, 0.3, 0.2])
    outcomes = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 0, 0])
    groups = torch.tensor([0, 7, 0, 1, 7, 1, 2, 2, 3, 7])
    # prompt 0: .9 > .2 -> 1 | prompt 1: .5 == .5 -> 0.5 | prompt 2: both correct, no pair
    # prompt 3: single trajectory | prompt 7: 0 + 1
    # -> (1 + 0.5 + 1) / (1 + 1 + 2) = 2.5 / 4
    acc, pairs = pairwise_outcome_accuracy(values, outcomes, groups)
    assert (acc, pairs) == (approx(0.625), 4)
    acc, pairs = pairwise_outcome_accuracy(values, outcomes.bool(), groups)  # bool outcomes too
    assert (acc, pairs) == (approx(0.625), 4)
    acc, pairs = pairwise_outcome_accuracy(values, torch.ones(10), groups)
    assert pairs == 0 and math.isnan(acc)


def test_best_of_k_accuracy_hand_computed():
    # same rows as above; pick per prompt (ties -> earliest row of the prompt):
    # prompt 0: .9 (row 0, correct) -> 1 | prompt 1: .5 row 3 vs .5 row 5, tie -> row 3, correct -> 1
    # prompt 2: .7 (row 6, correct) -> 1 | prompt 3: .3 (row 8, incorrect) -> 0
    # prompt 7: .6 (row 4, incorrect) -> 0  ->  3 / 5
    values = torch.tensor([0.9, 0.4, 0.2, 0.5, 0.6, 0.5, 0.7, 0.1, 0.3, 0.2])
    outcomes = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 0, 0])
    groups = torch.tensor([0, 7, 0, 1, 7, 1, 2, 2, 3, 7])
    assert best_of_k_accuracy(values, outcomes, groups) == (approx(0.6), 5)
    # swapping the tied rows' order changes the pick of prompt 1 to the incorrect one: 2 / 5
    swapped = [0, 1, 2, 5, 4, 3, 6, 7, 8, 9]
    assert best_of_k_accuracy(values[swapped], outcomes[swapped], groups[swapped]) == (approx(0.4), 5)
    acc, n = best_of_k_accuracy(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert n == 0 and math.isnan(acc)
    with pytest.raises(ValueError, match="outcomes"):
        best_of_k_accuracy(values, outcomes * 2, groups)
    with pytest.raises(ValueError, match="group_ids"):
        best_of_k_accuracy(values, outcomes, groups[:3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_of_k_accuracy_matches_naive(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 4, (200,), generator=g).double()  # many ties
    outcomes = torch.randint(0, 2, (200,), generator=g)
    groups = torch.randint(0, 30, (200,), generator=g)
    best = {}
    for i in range(200):  # first strictly higher value wins, so ties keep the earliest row
        k = int(groups[i])
        if k not in best or values[i] > values[best[k]]:
            best[k] = i
    naive = sum(int(outcomes[i]) for i in best.values()) / len(best)
    assert best_of_k_accuracy(values, outcomes, groups) == (approx(naive), len(best))


# ------------------------------------------------------------------------------------------------
# vectorised == naive loops
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_vectorised_matches_naive(seed):
    pred, mc, outcome, _, rank_pred, rank_truth, rank_mask = make_data(seed, n=300)
    with_outcome = seed % 2 == 0
    scale, shift = (0.5, 0.5) if seed == 3 else (1.0, 0.0)
    stats = CalibrationStats(pred_to_prob=(scale, shift))
    stats.update(pred, mc, outcome if with_outcome else None)
    got = stats.compute()
    want = naive_calibration(pred.tolist(), mc.tolist(), outcome.tolist() if with_outcome else None,
                             scale=scale, shift=shift)  # fmt: skip
    assert got == {k: approx(v) for k, v in want.items()}

    correct, pairs = naive_rank(rank_pred, rank_truth, rank_mask)
    assert rank_accuracy(rank_pred, rank_truth, rank_mask) == (approx(correct / pairs), pairs)

    g = torch.Generator().manual_seed(100 + seed)
    n = 200
    values = torch.randint(0, 5, (n,), generator=g).double() / 4  # coarse: frequent value ties
    outcomes = torch.randint(0, 2, (n,), generator=g)
    groups = torch.randint(-5, 25, (n,), generator=g) * 3  # negative, sparse, unsorted ids
    correct, pairs = naive_pairwise_outcome(values.tolist(), outcomes.tolist(), groups.tolist())
    assert pairs > 0
    assert pairwise_outcome_accuracy(values, outcomes, groups) == (approx(correct / pairs), pairs)


def test_rank_accuracy_chunked_over_groups(monkeypatch):
    # The memory-bounding chunk loop must give the same counts as one block.
    import lit_reason.metrics.calibration as cal

    _, _, _, _, rank_pred, rank_truth, rank_mask = make_data(5)
    whole = rank_accuracy(rank_pred, rank_truth, rank_mask)
    monkeypatch.setattr(cal, "_PAIR_BLOCK", 7 * 25)  # 7 groups per chunk, last chunk partial
    assert rank_accuracy(rank_pred, rank_truth, rank_mask) == whole


# ------------------------------------------------------------------------------------------------
# global sufficient statistics: chunking / merging never changes the result
# ------------------------------------------------------------------------------------------------


def _assert_same(a: CalibrationStats, b: CalibrationStats):
    ma, mb = a.compute(), b.compute()
    assert set(ma) == set(mb)
    assert ma == {k: approx(v) for k, v in mb.items()}
    assert a.reliability_table() == [{k: approx(v) for k, v in r.items()} for r in b.reliability_table()]
    assert a.mae_by_step() == {k: approx(v) for k, v in b.mae_by_step().items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_updates_equal_single_update(seed):
    pred, mc, outcome, steps, rank_pred, rank_truth, rank_mask = make_data(seed)
    whole = CalibrationStats()
    whole.update(pred, mc, outcome, steps)
    whole.update_rank(rank_pred, rank_truth, rank_mask)

    chunked = CalibrationStats()
    cuts = [0, 1, 17, 250, 251, 600]  # uneven micro-batches, including size-1 and empty-ish
    for lo, hi in itertools.pairwise(cuts):
        chunked.update(pred[lo:hi], mc[lo:hi], outcome[lo:hi], steps[lo:hi])
    chunked.update(pred[:0], mc[:0], outcome[:0], steps[:0])  # empty batch is a no-op
    for lo, hi in [(0, 4), (4, 5), (5, 30)]:
        chunked.update_rank(rank_pred[lo:hi], rank_truth[lo:hi], rank_mask[lo:hi])
    _assert_same(chunked, whole)

    # The guarantee is not vacuous: averaging per-batch metrics would differ here.
    per_batch = []
    for lo, hi in [(0, 17), (17, 600)]:
        s = CalibrationStats()
        s.update(pred[lo:hi], mc[lo:hi], outcome[lo:hi])
        per_batch.append(s.compute()["ece"])
    assert sum(per_batch) / 2 != approx(whole.compute()["ece"])

    # merge of two partial accumulators == the whole, too
    left, right = CalibrationStats(), CalibrationStats()
    left.update(pred[:123], mc[:123], outcome[:123], steps[:123])
    right.update(pred[123:], mc[123:], outcome[123:], steps[123:])
    left.update_rank(rank_pred, rank_truth, rank_mask)
    _assert_same(left.merge(right), whole)

    # checkpoint round-trip keeps the sums
    restored = CalibrationStats()
    restored.load_state_dict(whole.state_dict())
    _assert_same(restored, whole)


def test_mixed_outcome_batches_use_labelled_states_only():
    pred, mc, outcome, _, _, _, _ = make_data(4)
    mixed = CalibrationStats()
    mixed.update(pred[:200], mc[:200], outcome[:200])
    mixed.update(pred[200:], mc[200:])  # no outcome for these states
    labelled = CalibrationStats()
    labelled.update(pred[:200], mc[:200], outcome[:200])
    everything = CalibrationStats()
    everything.update(pred, mc)
    m = mixed.compute()
    assert m["ece"] == approx(labelled.compute()["ece"])
    assert m["brier"] == approx(labelled.compute()["brier"])
    assert m["ece_vs_mc"] == approx(everything.compute()["ece_vs_mc"])
    assert mixed.outcome_count == 200 and mixed.count == 600


def test_rank_stats_accumulates_globally():
    _, _, _, _, rank_pred, rank_truth, rank_mask = make_data(6)
    rs = RankStats()
    rs.update(rank_pred[:10], rank_truth[:10], rank_mask[:10])
    rs.update(rank_pred[10:], rank_truth[10:], rank_mask[10:])
    acc, pairs = rank_accuracy(rank_pred, rank_truth, rank_mask)
    assert rs.compute() == {"rank_acc": approx(acc), "rank_pairs": pairs}

    values = torch.tensor([0.9, 0.1, 0.4, 0.6])
    outcomes = torch.tensor([1, 0, 1, 0])
    grouped = RankStats()
    grouped.update_grouped(values[:2], outcomes[:2], torch.tensor([0, 0]))
    grouped.update_grouped(values[2:], outcomes[2:], torch.tensor([1, 1]))
    assert grouped.compute() == {"rank_acc": 0.5, "rank_pairs": 2}  # (1 + 0) / 2


# ------------------------------------------------------------------------------------------------
# DDP: all_reduce over 2 real gloo processes equals the single-process concatenation
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=30))  # fmt: skip
    try:
        pred, mc, outcome, steps, rank_pred, rank_truth, rank_mask = make_data(11)
        lo, hi = (0, 150) if rank == 0 else (150, 600)  # uneven shards, as DistributedSampler tails
        stats = CalibrationStats()
        for a in range(lo, hi, 64):  # several micro-batches per rank as well
            b = min(a + 64, hi)
            stats.update(pred[a:b], mc[a:b], outcome[a:b], steps[a:b])
        glo, ghi = (0, 9) if rank == 0 else (9, 30)
        stats.update_rank(rank_pred[glo:ghi], rank_truth[glo:ghi], rank_mask[glo:ghi])
        stats.all_reduce()
        rs = RankStats()
        rs.update(rank_pred[glo:ghi], rank_truth[glo:ghi], rank_mask[glo:ghi])
        rs.all_reduce()
        result = {
            "metrics": stats.compute(),
            "table": stats.reliability_table(),
            "steps": stats.mae_by_step(),
            "rank": rs.compute(),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_processes_equals_concatenation(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 60
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("DDP workers did not finish within 60 s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()

    pred, mc, outcome, steps, rank_pred, rank_truth, rank_mask = make_data(11)
    whole = CalibrationStats()
    whole.update(pred, mc, outcome, steps)
    whole.update_rank(rank_pred, rank_truth, rank_mask)
    acc, pairs = rank_accuracy(rank_pred, rank_truth, rank_mask)
    for rank in (0, 1):
        got = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        assert got["metrics"] == {k: approx(v) for k, v in whole.compute().items()}
        assert got["table"] == [{k: approx(v) for k, v in r.items()} for r in whole.reliability_table()]
        assert {int(k): v for k, v in got["steps"].items()} == {
            k: approx(v) for k, v in whole.mae_by_step().items()
        }
        assert got["rank"] == {"rank_acc": approx(acc), "rank_pairs": pairs}


def test_all_reduce_without_process_group_is_noop():
    stats = CalibrationStats()
    stats.update(torch.tensor([0.2, 0.8]), torch.tensor([0.0, 1.0]))
    before = stats.compute()
    assert stats.all_reduce().compute() == before


# ------------------------------------------------------------------------------------------------
# reliability PNG
# ------------------------------------------------------------------------------------------------


def test_plot_reliability_writes_valid_png_atomically(tmp_path):
    pred, mc, outcome, _, _, _, _ = make_data(7)
    stats = CalibrationStats()
    stats.update(pred, mc, outcome)
    dest = tmp_path / "plots" / "reliability.png"  # parent does not exist yet
    out = plot_reliability(stats.reliability_table(), dest, title="probe set, step 100")
    assert Path(out) == dest
    data = dest.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # a real rendered figure, not an empty stub
    assert sorted(p.name for p in dest.parent.iterdir()) == ["reliability.png"]  # no temp left

    # overwrite in place; a table without outcomes (frac_positive nan) and empty bins still plots
    mc_only = CalibrationStats()
    mc_only.update(torch.tensor([0.05, 0.5]), torch.tensor([0.0, 1.0]))
    plot_reliability(mc_only.reliability_table(), dest, title="mc only")
    assert dest.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and dest.read_bytes() != data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["reliability.png"]


def test_plot_reliability_failure_leaves_no_temp(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    stats = CalibrationStats()
    stats.update(torch.tensor([0.5]), torch.tensor([0.5]))
    with pytest.raises(RuntimeError, match="disk full"):
        plot_reliability(stats.reliability_table(), tmp_path / "r.png", title="x")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="empty"):
        plot_reliability([], tmp_path / "r.png", title="x")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    stats = CalibrationStats()
    with pytest.raises(ValueError, match="no states to calibrate"):
        stats.compute()
    with pytest.raises(ValueError, match="^mc has shape"):
        stats.update(torch.rand(4), torch.rand(3))
    with pytest.raises(ValueError, match="^outcome has shape"):
        stats.update(torch.rand(4), torch.rand(4), outcome=torch.ones(5))
    with pytest.raises(ValueError, match="^step_index has shape"):
        stats.update(torch.rand(4), torch.rand(4), step_index=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="pred contains 1 non-finite"):
        stats.update(torch.tensor([0.1, float("nan")]), torch.rand(2))
    with pytest.raises(ValueError, match="mc contains 1 non-finite"):
        stats.update(torch.rand(2), torch.tensor([float("inf"), 0.2]))
    with pytest.raises(ValueError, match=r"mc must lie in \[0, 1\]"):
        stats.update(torch.rand(2), torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="outcome must hold only 0/1"):
        stats.update(torch.rand(2), torch.rand(2), outcome=torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="step_index must be non-negative"):
        stats.update(torch.rand(2), torch.rand(2), step_index=torch.tensor([0, -1]))
    # a rejected update leaves nothing behind (no half-accumulated batch)
    with pytest.raises(ValueError, match="no states to calibrate"):
        stats.compute()

    with pytest.raises(ValueError, match="^truth has shape"):
        rank_accuracy(torch.rand(2, 3), torch.rand(2, 4))
    with pytest.raises(ValueError, match="^mask has shape"):
        rank_accuracy(torch.rand(2, 3), torch.rand(2, 3), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="pred contains 1 non-finite"):
        rank_accuracy(torch.tensor([[0.1, float("nan")]]), torch.rand(1, 2))
    with pytest.raises(ValueError, match=r"pred must have shape \[G, n\]"):
        rank_accuracy(torch.rand(4), torch.rand(4))
    with pytest.raises(ValueError, match="^group_ids has shape"):
        pairwise_outcome_accuracy(torch.rand(4), torch.ones(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="values contains 1 non-finite"):
        pairwise_outcome_accuracy(torch.tensor([float("nan"), 0.1]), torch.tensor([1, 0]), torch.zeros(2))
    with pytest.raises(ValueError, match="outcomes must hold only 0/1"):
        pairwise_outcome_accuracy(torch.rand(2), torch.tensor([2, 0]), torch.zeros(2))

    with pytest.raises(ValueError, match="configurations differ"):
        CalibrationStats(n_bins=10).merge(CalibrationStats(n_bins=5))
    with pytest.raises(ValueError, match="unknown pred_to_prob preset"):
        CalibrationStats(pred_to_prob="sigmoid")
    with pytest.raises(ValueError, match="non-zero scale"):
        CalibrationStats(pred_to_prob=(0.0, 0.5))
