"""Rejection-sampling fine-tuning (RFT; docs/baselines.md).

Sample N responses per training prompt from the start policy, keep the correct ones (R = 1), SFT
on them: ``-masked_mean_tokens log pi_theta(y | x)`` (:func:`lit_reason.losses.sft_loss`). With
:class:`lit_reason.callbacks.IterativeRounds` each round re-samples from the current policy (STaR /
RestEM style, continuing from the current weights).
"""

from __future__ import annotations

import random

import torch

from lit_reason.data.selection import group_by_prompt, is_positive
from lit_reason.losses.sft import sft_loss
from lit_reason.methods.offline import OfflineRL
from lit_reason.models.logprobs import response_logprobs


class RFT(OfflineRL):
    """SFT on the collected correct samples. Other arguments: :class:`~lit_reason.methods.offline.OfflineRL`.

    Args:
        max_per_prompt: Correct responses kept per prompt at most (None: all); drawn with ``seed``.
        dedupe: Keep one copy of identical correct responses of a prompt (so easy prompts, whose
            samples repeat, do not dominate the data).
    """

    def __init__(self, max_per_prompt: int | None = None, dedupe: bool = True, **kwargs) -> None:
        if max_per_prompt is not None and max_per_prompt < 1:
            raise ValueError(f"max_per_prompt must be >= 1 or None, got {max_per_prompt}")
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["task"])

    def select_items(self, rows: list[dict]) -> list[dict]:
        kept: list[dict] = []
        prompts_without = 0
        for key, group in group_by_prompt(rows).items():
            pos = [r for r in group if is_positive(r) and r["finish"] != "length"]
            if self.hparams.dedupe:
                seen: dict[tuple, dict] = {}
                for r in pos:
                    seen.setdefault(tuple(r["response_ids"]), r)
                pos = list(seen.values())
            if not pos:
                prompts_without += 1
                continue
            cap = self.hparams.max_per_prompt
            if cap is not None and len(pos) > cap:
                pos = random.Random(f"{self.hparams.seed}/{key}").sample(pos, cap)
            kept.extend(pos)
        # prompts with no correct sample give no item: counted, never silently dropped
        self.data_stats["data/prompts_without_positive"] = float(prompts_without)
        if not kept:
            raise ValueError(f"RFT: no correct response in dataset {self.data_path} "
                             f"({len(rows)} rows): nothing to fine-tune on")
        return kept

    def training_step(self, rows: list[dict], batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            self.log_data_stats()
        b = self.to_batch(rows)
        logp = response_logprobs(self.policy, b.input_ids, b.attention_mask, b.prompt_len)
        loss, metrics = sft_loss(logp, b.response_mask)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=len(rows))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(rows))
        return loss
