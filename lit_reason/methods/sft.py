"""Supervised fine-tuning on a task's gold solutions (docs/baselines.md)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader

from lit_reason.data.sft import SFTDataset, collate_sft
from lit_reason.losses.sft import sft_loss
from lit_reason.methods.base import ReasoningModule
from lit_reason.methods.common import resolve_task, warmup_cosine
from lit_reason.models.logprobs import gather_logprobs
from lit_reason.models.policy import build_policy


def shifted_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log pi(x_{t+1} | x_<=t) for a right-padded batch: [B, T-1]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    return gather_logprobs(logits, input_ids[:, 1:])


class SFT(ReasoningModule):
    """Trains the policy on ``task.prompt(x) + task.reference_solution(x) + EOS``.

    Args:
        policy: Start policy (``embedded:tiny`` builds the tiny model from scratch).
        task: The task (instance, name, or ``{name: ..., **kwargs}``).
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup, then cosine decay over ``trainer.max_steps``.
        batch_size: Sequences per optimiser step.
        max_length: Longest prompt + solution; longer examples are an error, not cut.
        eval_limit: Validation (and ``test``) examples for ``val/loss`` / ``test/loss``.
        dtype: Parameter dtype of the policy.
        lora: LoRA arguments (peft), None for full fine-tuning.
        tiny: Size overrides of ``embedded:tiny``.
        seed: Shuffling seed of the training data.
    """

    def __init__(
        self,
        policy: str = "embedded:tiny",
        task: Any = "arithmetic",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        batch_size: int = 64,
        max_length: int = 256,
        eval_limit: int = 256,
        dtype: str | None = None,
        lora: dict | None = None,
        tiny: dict | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["task"])
        self.task = resolve_task(task)
        self.policy, self.tokenizer = build_policy(policy, dtype=dtype, lora=lora, tiny=tiny)
        self.task.use_tokenizer(self.tokenizer)  # chat prompts need the policy's chat template

    def _dataset(self, split: str, limit: int | None = None) -> SFTDataset:
        examples = self.task.examples(split)[:limit]
        return SFTDataset(self.tokenizer, [self.task.prompt(e) for e in examples],
                          [self.task.reference_solution(e) for e in examples], self.hparams.max_length)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self._dataset("train"), batch_size=self.hparams.batch_size, shuffle=True, generator=g,
                          collate_fn=partial(collate_sft, pad_token_id=self.tokenizer.pad_token_id), drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("validation", self.hparams.eval_limit), batch_size=self.hparams.batch_size,
                          collate_fn=partial(collate_sft, pad_token_id=self.tokenizer.pad_token_id))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("test", self.hparams.eval_limit), batch_size=self.hparams.batch_size,
                          collate_fn=partial(collate_sft, pad_token_id=self.tokenizer.pad_token_id))

    def _loss(self, batch: dict[str, torch.Tensor]):
        logprobs = shifted_logprobs(self.policy, batch["input_ids"], batch["attention_mask"])
        return sft_loss(logprobs, batch["loss_mask"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self._loss(batch)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, prog_bar=False)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, _ = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, _ = self._loss(batch)
        self.log("test/loss", loss, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = self.adamw(params, self.hparams.lr)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        sched = warmup_cosine(opt, self.hparams.warmup_steps, int(total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
