"""SFT loss (docs/baselines.md row SFT; token-mean normalisation is the library's)."""

from __future__ import annotations

import pytest
import torch

from lit_reason.losses import sft_loss


def test_sft_loss_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, 3.0, 3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, m = sft_loss(logprobs, mask)
    # valid: -1, -2, -0.5 -> NLL = (1 + 2 + 0.5) / 3 = 1.166667 (token mean over the minibatch)
    assert loss.item() == pytest.approx(3.5 / 3.0, abs=1e-6)
    assert m["nll"].item() == pytest.approx(3.5 / 3.0, abs=1e-6)
    # ppl = exp(1.166667) = 3.211271
    assert m["ppl"].item() == pytest.approx(3.2112705, abs=1e-5)
    assert m["num_tokens"].item() == 3.0
    loss.backward()
    # d/dlogp = -1/3 at each valid token, 0 elsewhere (no nan from the -inf padding)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 3, -1 / 3, 0.0], [-1 / 3, 0.0, 0.0]]))
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sft_loss_matches_naive_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(4, 9, generator=gen, dtype=torch.float64) * 5
    lengths = torch.randint(1, 10, (4,), generator=gen)
    mask = (torch.arange(9).unsqueeze(0) < lengths.unsqueeze(1)).double()
    loss, _ = sft_loss(logprobs, mask)
    vals = [-float(logprobs[b, t]) for b in range(4) for t in range(9) if mask[b, t]]
    assert loss.item() == pytest.approx(sum(vals) / len(vals), abs=1e-12)


def test_sft_loss_shape_mismatch():
    with pytest.raises(ValueError, match="mask"):
        sft_loss(torch.zeros(2, 3), torch.ones(2, 2))
