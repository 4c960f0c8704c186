"""Export the trained policy as a ``save_pretrained`` folder at the end of fit."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import lightning.pytorch as pl


def save_policy(model, tokenizer, dirpath: str | os.PathLike) -> Path:
    """Writes ``model`` and ``tokenizer`` to ``dirpath`` atomically (temp folder, then rename).

    A LoRA policy is merged into its base first, so the folder loads with plain
    ``AutoModelForCausalLM.from_pretrained``.
    """
    dirpath = Path(dirpath)
    dirpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dirpath.parent, prefix=f".{dirpath.name}.tmp-"))
    try:
        to_save = model
        if hasattr(model, "merge_and_unload"):
            import copy

            to_save = copy.deepcopy(model).merge_and_unload()
        to_save.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if dirpath.exists():
            old = dirpath.with_name(f".{dirpath.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dirpath, old)
            os.replace(tmp, dirpath)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dirpath)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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

    def __init__(self, dirpath: str | None = None, value_dirpath: str | None = None) -> None:
        if dirpath is None and value_dirpath is None:
            raise ValueError("ExportPolicy needs dirpath and/or value_dirpath")
        self.dirpath = dirpath
        self.value_dirpath = value_dirpath

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.value_dirpath is not None and getattr(pl_module, "value_model", None) is None:
            raise ValueError(f"ExportPolicy(value_dirpath=...): {type(pl_module).__name__} has no `value_model` to export")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            if self.dirpath is not None:
                save_policy(pl_module.policy, pl_module.tokenizer, self.dirpath)
            if self.value_dirpath is not None:
                pl_module.value_model.save(self.value_dirpath, tokenizer=pl_module.tokenizer)
