"""The policy (any causal LM, optional LoRA) and its frozen reference.

The reference is either a frozen copy of the start policy, or, under LoRA, the same base model with
the adapter disabled, so no second copy sits in memory.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any

import torch

from lit_reason.models.loading import load_policy
from lit_reason.models.logprobs import response_logits, response_logprobs


def build_policy(
    name: str,
    dtype: str | None = None,
    lora: dict[str, Any] | None = None,
    tiny: dict[str, Any] | None = None,
    gradient_checkpointing: bool = False,
):
    """Loads the policy and wraps it with LoRA when asked.

    Args:
        name: Policy name or folder (see :func:`lit_reason.models.loading.load_policy`).
        dtype: Parameter dtype (``bf16`` on GPUs).
        lora: ``peft.LoraConfig`` arguments (e.g. ``{r: 8, lora_alpha: 16, target_modules: all-linear}``).
        tiny: Size overrides for ``embedded:tiny``.
        gradient_checkpointing: Trade compute for activation memory (real models).

    Returns:
        ``(model, tokenizer)``.
    """
    model, tokenizer = load_policy(name, dtype=dtype, tiny_kwargs=tiny)
    model.train()  # from_pretrained returns eval mode; the training loops switch to eval where they sample
    if gradient_checkpointing:
        # non-reentrant: gradients reach LoRA adapters behind frozen embeddings without input grads
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = dict(lora)
        cfg.setdefault("task_type", "CAUSAL_LM")
        model = get_peft_model(model, LoraConfig(**cfg))
    return model, tokenizer


def freeze(model):
    """Makes ``model`` a frozen model (reference copy, DVPO's GVM): no gradients, eval mode; returns it.

    Eval mode must also survive Lightning's ``module.train()`` calls: a module holding a frozen
    submodule re-applies ``eval()`` in its ``train`` override; the reference is kept outside the
    module's submodules (so also outside ``state_dict`` and the optimiser) and is never switched.
    """
    model.requires_grad_(False)
    model.eval()
    return model


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class Reference:
    """Frozen reference log-probabilities for a policy.

    Kept outside the LightningModule's parameters on purpose: it is never trained, never saved in
    checkpoints (it is rebuilt from the policy name), and gets no optimiser state.

    Args:
        policy: The trainable policy at its starting point.
    """

    def __init__(self, policy) -> None:
        self.shares_policy = is_lora(policy)
        if self.shares_policy:
            self._model = [policy]
        else:
            self._model = [freeze(copy.deepcopy(policy))]

    @property
    def model(self):
        return self._model[0]

    def _context(self):
        return self.model.disable_adapter() if self.shares_policy else nullcontext()

    def _sync_device(self, device: torch.device) -> None:
        if not self.shares_policy and next(self.model.parameters()).device != device:
            self.model.to(device)

    @torch.no_grad()
    def logprobs(self, input_ids, attention_mask, prompt_len: int, temperature: float = 1.0,
                 length_groups: int = 1) -> torch.Tensor:
        """[B, L] reference log-probabilities of the response tokens (``length_groups``:
        :func:`~lit_reason.models.logprobs.response_logprobs`)."""
        self._sync_device(input_ids.device)
        with self._context():
            return response_logprobs(self.model, input_ids, attention_mask, prompt_len, temperature, length_groups)

    @torch.no_grad()
    def logits(self, input_ids, attention_mask, prompt_len: int) -> torch.Tensor:
        """[B, L, V] reference logits of the response positions."""
        self._sync_device(input_ids.device)
        with self._context():
            return response_logits(self.model, input_ids, attention_mask, prompt_len)
