"""Supervised fine-tuning loss (docs/baselines.md).

The baselines' SFT loss is ``-sum_t log pi_theta(y*_t | x, y*_<t)`` on gold solutions. RFT / RestEM use the
same loss on the kept (R = 1) samples.
"""

from __future__ import annotations

import torch

from lit_reason.losses.common import check_same_shape, masked_mean

__all__ = ["sft_loss"]


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean negative log-likelihood over valid tokens.

    ``L = -masked_mean_tokens(logprobs)``: the sum over every valid token of the minibatch
    divided by their count. The papers write a per-sequence *sum*; normalising by the
    number of tokens of the minibatch is the library's choice (the usual causal-LM convention; it
    changes only the scale of the gradient, not the optimum).

    Args:
        logprobs: log pi_theta(y*_t | x, y*_<t) of the gold tokens, ``[B, L]``.
        mask: ``[B, L]`` bool or 0/1 float; 1 = token that is trained on (response incl. EOS).

    Returns:
        ``(loss, metrics)``: scalar loss; detached scalar metrics ``nll`` (the loss),
        ``ppl`` (``exp(nll)``), ``num_tokens`` (valid-token count).

    Raises:
        ValueError: If ``mask`` does not have the shape of ``logprobs``.
    """
    check_same_shape("logprobs", logprobs, mask=mask)
    loss = -masked_mean(logprobs, mask)
    with torch.no_grad():
        metrics = {
            "nll": loss.detach(),
            "ppl": torch.exp(loss.detach()),
            "num_tokens": (mask != 0).sum().to(loss.dtype),
        }
    return loss, metrics
