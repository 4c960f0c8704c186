"""GRPO and RLOO sequence advantages (docs/baselines.md rows GRPO, RLOO)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_reason.losses import grpo_advantages, rloo_advantages

# groups: label 7 -> rewards (1, 0, 1, 1) ; label 3 -> (0, 0) ; label 9 -> (1,) ; interleaved order
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
GROUPS = torch.tensor([7, 3, 7, 9, 7, 7, 3])


def test_grpo_unbiased_std_by_hand():
    adv = grpo_advantages(REWARDS, GROUPS)
    # group 7: mean 0.75 ; deviations (0.25, -0.75, 0.25, 0.25) ; sum sq = 0.75
    #   unbiased var = 0.75 / 3 = 0.25 -> std 0.5 ; A = 0.25/0.5 = 0.5 for R=1, -0.75/0.5 = -1.5 for R=0
    # group 3: all equal -> 0/(0 + eps) = 0 ; group 9: singleton -> 0
    expected = torch.tensor([0.5, 0.0, -1.5, 0.0, 0.5, 0.5, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    # eps sits on the std: 0.25 / (0.5 + 1e-6) = 0.4999990
    assert adv[0].item() == pytest.approx(0.25 / (0.5 + 1e-6), abs=1e-7)


def test_grpo_population_std_by_hand():
    adv = grpo_advantages(REWARDS, GROUPS, unbiased=False)
    # group 7: biased var = 0.75 / 4 = 0.1875 -> std 0.433013 ; 0.25/0.433013 = 0.577350 ; -0.75/.. = -1.732051
    s = math.sqrt(0.1875)
    expected = torch.tensor([0.25 / s, 0.0, -0.75 / s, 0.0, 0.25 / s, 0.25 / s, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_grpo_unscaled_by_hand():
    adv = grpo_advantages(REWARDS, GROUPS, scale=False)
    # only the group mean is subtracted: group 7 mean 0.75 ; group 3 mean 0 ; singleton -> R - R = 0
    torch.testing.assert_close(adv, torch.tensor([0.25, 0.0, -0.75, 0.0, 0.25, 0.25, 0.0]))


def test_rloo_by_hand():
    adv = rloo_advantages(REWARDS[GROUPS != 9], GROUPS[GROUPS != 9])
    # group 7 (k=4, sum 3): R=1 -> 1 - (3-1)/3 = 1/3 ; R=0 -> 0 - 3/3 = -1 ; group 3 -> 0
    expected = torch.tensor([1 / 3, 0.0, -1.0, 1 / 3, 1 / 3, 0.0])
    torch.testing.assert_close(adv, expected)


def test_rloo_singleton_group_raises_naming_it():
    with pytest.raises(ValueError, match=r"\[9\]"):
        rloo_advantages(REWARDS, GROUPS)


def _random_groups(seed):
    gen = torch.Generator().manual_seed(seed)
    num_groups = int(torch.randint(1, 6, (1,), generator=gen))
    labels = torch.randperm(1000, generator=gen)[:num_groups] - 500  # arbitrary, possibly negative labels
    sizes = torch.randint(2, 7, (num_groups,), generator=gen)
    group_ids = torch.repeat_interleave(labels, sizes)
    perm = torch.randperm(group_ids.numel(), generator=gen)
    group_ids = group_ids[perm]
    rewards = torch.randn(group_ids.numel(), generator=gen, dtype=torch.float64)
    rewards[::3] = torch.round(rewards[::3])  # some ties
    return rewards, group_ids


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale,unbiased", [(True, True), (True, False), (False, True)])
def test_grpo_matches_naive_loop(seed, scale, unbiased):
    rewards, group_ids = _random_groups(seed)
    out = grpo_advantages(rewards, group_ids, scale=scale, unbiased=unbiased)
    ref = torch.zeros_like(rewards)
    for i in range(rewards.numel()):
        members = [float(rewards[j]) for j in range(rewards.numel()) if group_ids[j] == group_ids[i]]
        n = len(members)
        mean = sum(members) / n
        if not scale:
            ref[i] = float(rewards[i]) - mean
            continue
        var = sum((m - mean) ** 2 for m in members) / ((n - 1) if unbiased else n)
        ref[i] = (float(rewards[i]) - mean) / (math.sqrt(var) + 1e-6)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_rloo_matches_naive_loop(seed):
    rewards, group_ids = _random_groups(seed)
    out = rloo_advantages(rewards, group_ids)
    ref = torch.zeros_like(rewards)
    for i in range(rewards.numel()):
        others = [float(rewards[j]) for j in range(rewards.numel()) if group_ids[j] == group_ids[i] and j != i]
        ref[i] = float(rewards[i]) - sum(others) / len(others)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    # RLOO = k/(k-1) * (R - group mean)
    for g in group_ids.unique():
        sel = group_ids == g
        k = int(sel.sum())
        torch.testing.assert_close(out[sel], k / (k - 1) * (rewards[sel] - rewards[sel].mean()))


def test_grpo_int_rewards_and_detached():
    r = torch.tensor([1.0, 0.0], requires_grad=True)
    adv = grpo_advantages(r, torch.tensor([0, 0]))
    assert not adv.requires_grad
    # (1 - 0.5) / (std(1, 0) = 0.707107 + eps) = 0.707106
    torch.testing.assert_close(adv, torch.tensor([0.7071063, -0.7071063]), atol=1e-6, rtol=0)
    adv_int = grpo_advantages(torch.tensor([1, 0]), torch.tensor([5, 5]))
    assert adv_int.dtype == torch.get_default_dtype()


def test_group_advantages_bad_inputs():
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids"):
        rloo_advantages(torch.zeros(3), torch.zeros(3))  # float labels
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
