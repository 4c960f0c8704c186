"""DPO on collected pairs (arXiv 2305.18290, Eq. 7; docs/baselines.md; OREO's baseline: beta 0.1).

Pairs (y_w correct, y_l wrong) of one prompt come from :func:`lit_reason.data.dpo_pairs`
(at most ``max_pairs`` per prompt); prompts whose samples are all wrong or all right give no pair
and are counted in ``data/prompts_all_negative`` / ``data/prompts_all_positive``; a dataset with no
pair at all is an error. The loss is :func:`lit_reason.losses.dpo_loss` on summed sequence
log-ratios against the frozen start policy; ``dpo_positive_lambda > 0`` gives DPO-Positive.
"""

from __future__ import annotations

import torch

from lit_reason.data.selection import dpo_pairs
from lit_reason.losses.dpo import dpo_loss, sequence_logratios
from lit_reason.methods.offline import OfflineRL
from lit_reason.models.logprobs import response_logprobs


class DPO(OfflineRL):
    """DPO. Other arguments: :class:`~lit_reason.methods.offline.OfflineRL`.

    Args:
        beta: DPO temperature (0.1).
        max_pairs: Pairs per prompt at most (OREO 1.5B: 6).
        dpo_positive_lambda: DPO-Positive penalty weight (0 = plain DPO; VinePPO's DPO+ uses 50).
        length_groups: A batch's sequences are sorted by length and scored in this many forward
            passes, each cut to its own longest sequence: the same loss with fewer pad tokens
            computed (:func:`~lit_reason.models.logprobs.response_logprobs`). 1 = one padded pass.
    """

    value_range = (-1.0, 1.0)

    def __init__(self, beta: float = 0.1, max_pairs: int = 6, dpo_positive_lambda: float = 0.0,
                 length_groups: int = 2, **kwargs) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if length_groups < 1:
            raise ValueError(f"length_groups must be >= 1, got {length_groups}")
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["task"])

    def select_items(self, rows: list[dict]) -> list[tuple[dict, dict]]:
        pairs, stats = dpo_pairs(rows, max_pairs=self.hparams.max_pairs, seed=self.hparams.seed)
        self.data_stats.update({f"data/{k}": float(v) for k, v in stats.items()})
        return pairs

    def training_step(self, pairs: list[tuple[dict, dict]], batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            self.log_data_stats()
        n = len(pairs)
        b = self.to_batch([w for w, _ in pairs] + [lose for _, lose in pairs])
        groups = self.hparams.length_groups
        logp = response_logprobs(self.policy, b.input_ids, b.attention_mask, b.prompt_len, length_groups=groups)
        ref = self.reference.logprobs(b.input_ids, b.attention_mask, b.prompt_len, length_groups=groups)
        ratios = sequence_logratios(logp, ref, b.response_mask)
        seq_logp = (logp * b.response_mask).sum(-1)
        seq_ref = (ref * b.response_mask).sum(-1)
        loss, metrics = dpo_loss(ratios[:n], ratios[n:], beta=self.hparams.beta,
                                 dpo_positive_lambda=self.hparams.dpo_positive_lambda,
                                 chosen_logprobs=seq_logp[:n], chosen_ref_logprobs=seq_ref[:n])
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def state_values(self, prompt_ids, partial_ids, examples) -> torch.Tensor:
        """Value-calibration protocol: the implicit value ``beta * sum log pi/pi_ref`` of the partial
        response (DPO has no explicit value; only the ranking metrics are scale-free)."""
        return self.implicit_state_values(prompt_ids, partial_ids, self.hparams.beta)
