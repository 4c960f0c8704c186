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
        dirpath: Target folder (created or replaced atomically).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            save_policy(pl_module.policy, pl_module.tokenizer, self.dirpath)
