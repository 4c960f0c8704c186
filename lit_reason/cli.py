"""``python -m lit_reason``: LightningCLI (fit/validate/test) plus the ``evaluate`` command.

Config files are parsed in jsonargparse's ``omegaconf+`` mode: ``${...}`` interpolation is resolved
after every ``--config`` file and command-line override has been merged, so
``save_dir: ${trainer.default_root_dir}`` follows a ``--trainer.default_root_dir`` override.
A config fragment with ``trainer: {callbacks+: [...]}`` appends callbacks to a recipe's list.
"""

from __future__ import annotations

import os
import sys

EXTRA_COMMANDS = {
    "evaluate": "accuracy of a policy on a task (greedy pass@1; --samples K: mean pass@1 and majority vote; "
                "--search beam --value DIR: value-guided step beam search)",
    "collect": "roll out a policy on a task split into a resumable trajectory dataset (offline methods' data)",
}


def _set_defaults() -> None:
    # W&B stays offline (no network, no login prompt) unless the user asks for it
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_lightning_cli(args: list[str] | None = None):
    """Runs LightningCLI with lit_reason's parser settings; returns the CLI object."""
    import lightning.pytorch as pl
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    # recipes write ``${trainer.default_root_dir}`` from their own root; under a subcommand the
    # merged config lives below ``fit.``, so absolute paths are read as relative to the file's root
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

    return LightningCLI(
        pl.LightningModule,
        subclass_mode_model=True,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m lit_reason`` and the ``lit-reason`` script."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _set_defaults()
    if argv and argv[0] == "evaluate":
        from lit_reason.commands.evaluate import main as evaluate_main

        sys.exit(evaluate_main(argv[1:]))
    if argv and argv[0] == "collect":
        from lit_reason.commands.collect import main as collect_main

        sys.exit(collect_main(argv[1:]))
    if not argv or argv[0] in ("-h", "--help"):
        print("lit_reason commands: fit, validate, test (LightningCLI; `--help` after each), and")
        for name, text in EXTRA_COMMANDS.items():
            print(f"  {name:<10} {text}")
        print()
    # args=None lets LightningCLI read sys.argv itself; passing a copy of it makes Lightning warn
    # "not recommended to provide both args and command line arguments" on every run
    run_lightning_cli(None if from_command_line else argv)
