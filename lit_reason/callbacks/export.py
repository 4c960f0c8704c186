"""Export the trained policy as a ``save_pretrained`` folder at the end of fit."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl

from lit_reason.contracts import ExportsValue, HasPolicy, require
from lit_reason.io import atomic_dir
from lit_reason.parallel.fsdp import full_state_dict, is_sharded, unsharded_copy


ADAPTER_SUBDIR = "adapter"


def save_policy(model, tokenizer, dirpath: str | os.PathLike) -> Path:
    """Writes ``model`` and ``tokenizer`` to ``dirpath`` atomically (temp folder, then rename).

    A LoRA policy is merged into its base first, so the folder loads with plain
    ``AutoModelForCausalLM.from_pretrained``; its adapter alone (``adapter_config.json`` +
    ``adapter_model.safetensors``, a few MB) is saved too, in ``dirpath/adapter`` (load it with
    ``peft.PeftModel.from_pretrained(base, dirpath / "adapter")`` on the start policy).
    """
    dirpath = Path(dirpath)
    with atomic_dir(dirpath) as tmp:  # temp folder beside it, then swapped in
        to_save = model
        # the policy's own adapter only: with a shared trunk the PeftModel also holds the value adapter
        own = [model.active_adapter] if hasattr(model, "peft_config") else None
        if hasattr(model, "merge_and_unload"):
            import copy

            to_save = copy.deepcopy(model).merge_and_unload(adapter_names=own)
        to_save.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
            # peft writes the adapter weights only
            model.save_pretrained(tmp / ADAPTER_SUBDIR, selected_adapters=own)
    return dirpath


class ExportPolicy(pl.Callback):
    """Saves ``pl_module.policy`` and ``pl_module.tokenizer`` to ``dirpath`` when fit ends.

    Args:
        dirpath: Target folder of the policy (created or replaced atomically); None skips it.
        value_dirpath: Also save ``pl_module.value_model`` (a
            :class:`~lit_reason.models.value.ValueModel`: OREO's and DQO's value model, DVPO's
            GVM) there with :meth:`~lit_reason.models.value.ValueModel.save`, for
            ``evaluate --search beam --value DIR`` or DVPO's stage 2.
    """

    @property
    def contract(self) -> type:
        """What the module must provide (lit_reason.contracts): a value model too for ``value_dirpath``."""
        return HasPolicy if self.value_dirpath is None else ExportsValue

    def __init__(self, dirpath: str | None = None, value_dirpath: str | None = None) -> None:
        if dirpath is None and value_dirpath is None:
            raise ValueError("ExportPolicy needs dirpath and/or value_dirpath")
        self.dirpath = dirpath
        self.value_dirpath = value_dirpath

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require(pl_module, self.contract, "ExportPolicy", error=ValueError)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        policy = pl_module.policy if self.dirpath is not None else None
        value = pl_module.value_model if self.value_dirpath is not None else None
        if is_sharded(policy) or is_sharded(value):
            self._export_sharded(trainer, pl_module, policy, value)
            return
        if trainer.is_global_zero:
            if self.dirpath is not None:
                save_policy(pl_module.policy, pl_module.tokenizer, self.dirpath)
            if self.value_dirpath is not None:
                pl_module.value_model.save(self.value_dirpath, tokenizer=pl_module.tokenizer)

    def _export_sharded(self, trainer: pl.Trainer, pl_module: pl.LightningModule, policy, value) -> None:
        """FSDP: every rank takes part in gathering the full state; rank 0 alone writes the folders."""
        for model, dirpath, save in ((policy, self.dirpath, "policy"), (value, self.value_dirpath, "value")):
            if model is None:
                continue
            state = full_state_dict(model)  # a collective: all ranks, same order
            if trainer.is_global_zero:
                plain = unsharded_copy(model, state)
                if save == "policy":
                    save_policy(plain, pl_module.tokenizer, dirpath)
                else:
                    plain.save(dirpath, tokenizer=pl_module.tokenizer)
            del state
        trainer.strategy.barrier("lit_reason_export")
