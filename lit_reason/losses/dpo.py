"""DPO (arXiv 2305.18290, Eq. 7) and DPO-Positive (arXiv 2402.13228); see docs/baselines.md.

With the summed sequence log-ratio
``r(y) = log pi_theta(y|x) - log pi_ref(y|x)`` of a chosen (``w``) and a rejected (``l``)
response to the same prompt::

    DPO:   L = mean_pairs [ -log sigmoid( beta * (r_w - r_l) ) ]
    DPO+:  L = mean_pairs [ -log sigmoid( beta * (r_w - r_l - lambda * max(0, log pi_ref(y_w) - log pi_theta(y_w))) ) ]

Sources' settings: DPO with beta = 0.1 (OREO's baseline); DPO-Positive with lambda = 50 and beta = 0.1 (VinePPO's
``dpo_positive_trainer.py``, where the penalty sits inside the beta-scaled logit). DPO is the
response-level special case of the KL-regularised soft-Bellman view (OREO, arXiv 2412.16145, Sec. 3.3).

Shapes: ``B`` sequences, ``L`` response tokens, ``P`` pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_reason.losses.common import check_same_shape, masked_sum

__all__ = ["sequence_logratios", "dpo_loss"]


def sequence_logratios(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-ratio of each response, ``r_b = sum_t mask * (logp_t - ref_logp_t)``.

    Args:
        logprobs: log pi_theta of the taken tokens, ``[B, L]`` (gradients flow).
        ref_logprobs: log pi_ref of the taken tokens, ``[B, L]`` (detached inside).
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid response token (EOS included).

    Returns:
        ``[B]`` summed log-ratios (masked positions never leak, even if nan/inf).

    Raises:
        ValueError: On a shape mismatch (names the argument), non-2-D inputs, or a ``mask`` row
            with no valid token (an empty response has no log-ratio to compare).
    """
    if logprobs.dim() != 2:
        raise ValueError(f"`logprobs` must be [B, L], got shape {tuple(logprobs.shape)}")
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs, mask=mask)
    valid = mask != 0
    empty = ~valid.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"`mask` rows {torch.nonzero(empty).flatten().tolist()} have no valid token")
    diff = torch.where(valid, logprobs - ref_logprobs.detach().to(logprobs.dtype), torch.zeros_like(logprobs))
    return masked_sum(diff, mask, dim=1)


def _check_pair_vector(name: str, x: torch.Tensor | None, pairs: int) -> None:
    if x is not None and (x.dim() != 1 or x.shape[0] != pairs):
        raise ValueError(f"`{name}` must have shape ({pairs},), got {tuple(x.shape)}")


def dpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float = 0.1,
    dpo_positive_lambda: float = 0.0,
    chosen_logprobs: torch.Tensor | None = None,
    chosen_ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss, with the DPO-Positive penalty when ``dpo_positive_lambda > 0`` (docs/baselines.md).

    ::

        logit_p = r_w - r_l - lambda * max(0, log pi_ref(y_w) - log pi_theta(y_w))
        L       = mean_p [ -log sigmoid(beta * logit_p) ]

    The penalty is the chosen response's log-likelihood drop below the reference. It is read
    from ``chosen_ref_logprobs - chosen_logprobs`` (summed sequence log-probs ``[P]``) when both
    are given, else from ``-chosen_logratios`` (the same number: ``r_w = log pi_theta(y_w) -
    log pi_ref(y_w)``). With ``dpo_positive_lambda == 0`` the penalty is skipped entirely.

    Args:
        chosen_logratios: ``r_w`` per pair, ``[P]`` (from :func:`sequence_logratios`).
        rejected_logratios: ``r_l`` per pair, ``[P]``.
        beta: DPO temperature (source: 0.1).
        dpo_positive_lambda: lambda of DPO-Positive (source: 50 in VinePPO); 0 = plain DPO.
        chosen_logprobs: Optional summed log pi_theta(y_w), ``[P]``.
        chosen_ref_logprobs: Optional summed log pi_ref(y_w), ``[P]`` (constants).

    Returns:
        ``(loss, metrics)``: scalar loss (mean over pairs); detached scalar metrics
        ``dpo_loss``, ``reward_accuracy`` (fraction of pairs with ``r_w > r_l``, strictly),
        ``margin`` (mean ``beta * (r_w - r_l)``), ``chosen_reward`` / ``rejected_reward`` (mean
        ``beta * r``), ``positive_penalty`` (mean ``max(0, ref_w - logp_w)``; 0 for plain DPO).

    Raises:
        ValueError: On a shape mismatch (names the argument), zero pairs, a negative
            ``dpo_positive_lambda``, or only one of ``chosen_logprobs``/``chosen_ref_logprobs``.
    """
    if chosen_logratios.dim() != 1:
        raise ValueError(f"`chosen_logratios` must be [P], got shape {tuple(chosen_logratios.shape)}")
    pairs = chosen_logratios.shape[0]
    if pairs == 0:
        raise ValueError("`chosen_logratios` is empty: DPO needs at least one pair")
    _check_pair_vector("rejected_logratios", rejected_logratios, pairs)
    _check_pair_vector("chosen_logprobs", chosen_logprobs, pairs)
    _check_pair_vector("chosen_ref_logprobs", chosen_ref_logprobs, pairs)
    if dpo_positive_lambda < 0:
        raise ValueError(f"`dpo_positive_lambda` must be >= 0, got {dpo_positive_lambda}")
    if (chosen_logprobs is None) != (chosen_ref_logprobs is None):
        raise ValueError("`chosen_logprobs` and `chosen_ref_logprobs` must be given together")

    margin = chosen_logratios - rejected_logratios
    if dpo_positive_lambda > 0:
        if chosen_logprobs is not None:
            drop = chosen_ref_logprobs.detach().to(chosen_logprobs.dtype) - chosen_logprobs
        else:
            drop = -chosen_logratios
        penalty = torch.clamp(drop, min=0.0)
        logits = margin - dpo_positive_lambda * penalty
    else:
        penalty = torch.zeros_like(margin)
        logits = margin
    loss = -F.logsigmoid(beta * logits).mean()

    with torch.no_grad():
        metrics = {
            "dpo_loss": loss.detach(),
            "reward_accuracy": (chosen_logratios > rejected_logratios).to(margin.dtype).mean(),
            "margin": (beta * margin).detach().mean(),
            "chosen_reward": (beta * chosen_logratios).detach().mean(),
            "rejected_reward": (beta * rejected_logratios).detach().mean(),
            "positive_penalty": penalty.detach().mean(),
        }
    return loss, metrics
