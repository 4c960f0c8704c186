"""``python -m lit_reason``: LightningCLI (fit/validate/test) plus the ``evaluate`` command.

Config files are parsed in jsonargparse's ``omegaconf+`` mode: ``${...}`` interpolation is resolved
after every ``--config`` file and command-line override has been merged, so
``save_dir: ${trainer.default_root_dir}`` follows a ``--trainer.default_root_dir`` override.
A config fragment with ``trainer: {callbacks+: [...]}`` appends callbacks to a recipe's list.
"""

from __future__ import annotations

import os
import sys
import warnings

EXTRA_COMMANDS = {
    "evaluate": "accuracy of a policy on a task (greedy pass@1; --samples K: mean pass@1 and majority vote; "
                "--search beam --value DIR: value-guided step beam search)",
    "collect": "roll out a policy on a task split into a resumable trajectory dataset (offline methods' data)",
    "sweep": "run a W&B sweep of a recipe (sweeps/*.yaml): W&B's agent online, W&B's sweep engine offline",
}

# W&B's private setting ``x_transaction_log_flush_interval`` (seconds between writes of the run file)
WANDB_FLUSH_ENV = "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"
WANDB_FLUSH_SECONDS = "1"


def _set_defaults() -> None:
    # W&B stays offline (no network, no login prompt) unless the user asks for it
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    # wandb-core writes history to the run file every 15 s by default, so a killed run lost every
    # row of its last 15 s (all 16 rows of an 8-step run); flushing each second bounds the loss
    os.environ.setdefault(WANDB_FLUSH_ENV, WANDB_FLUSH_SECONDS)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cli_class():
    """LightningCLI with lit_reason's checks, run folders and tracking callbacks (built lazily: imports torch)."""
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from lit_reason.commands.config_checks import ConfigError, check_config
    from lit_reason.commands.run_folder import prepare_run_folder, resolve_ckpt_path

    class SaveFullConfig(SaveConfigCallback):
        """Writes ``config.yaml`` to the run folder and puts the whole resolved config in the W&B run's config."""

        def save_config(self, trainer, pl_module, stage: str) -> None:
            import yaml
            from lightning.pytorch.loggers import WandbLogger

            loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
            if loggers:
                full = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
                for logger in loggers:
                    logger.experiment.config.update(full, allow_val_change=True)

    class LitReasonCLI(LightningCLI):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, save_config_callback=SaveFullConfig, **kwargs)

        def _parse_ckpt_path(self) -> None:
            # before Lightning reads the checkpoint's hyper-parameters: `last` resolved, truncation named
            subcommand = self.config.get("subcommand")
            if subcommand in ("fit", "validate", "test"):
                resolve_ckpt_path(self.config[subcommand])
            super()._parse_ckpt_path()

        def before_instantiate_classes(self) -> None:
            # every check runs before the start policy (or anything else) is built
            cfg = self.config.get(self.subcommand)
            if cfg is None:
                return
            check_config(cfg)
            if self.subcommand == "fit":
                prepare_run_folder(cfg)

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
                # a constructor's own check (e.g. `mc_rollouts: 0`) as one line, not a parser traceback;
                # jsonargparse wraps it in "Does not validate against any of the Union subtypes", so the
                # innermost exception with a message is the one that names the key
                cause, inner = err, err
                while (cause := cause.__cause__ or cause.__context__) is not None:
                    if str(cause).strip():
                        inner = cause
                text = str(inner).strip()
                raise ConfigError(text.splitlines()[0] if text else repr(inner)) from err

        def instantiate_trainer(self, **kwargs):
            from lit_reason.callbacks.resume import ResumeState
            from lit_reason.callbacks.tracking import RunSummary, StepAxis, StepProgressBar

            extra = [ResumeState(), StepAxis(), RunSummary()]
            trainer_cfg = self._get(self.config_init, "trainer", default={})
            if trainer_cfg.get("enable_progress_bar", True) is not False and not any(
                    type(c).__name__.endswith("ProgressBar") for c in (trainer_cfg.get("callbacks") or [])):
                extra.append(StepProgressBar())
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": extra}
            return super().instantiate_trainer(**kwargs)

    return LitReasonCLI


def run_lightning_cli(args: list[str] | None = None):
    """Runs LightningCLI with lit_reason's parser settings; returns the CLI object.

    Before any class is built the config is checked (one-line ``error:`` naming the key), ``fit``
    gets its own run folder (``csv/version_N``, claimed atomically) and W&B run id, and a
    ``--ckpt_path`` inside a run folder resumes there. Every fit also gets ``ResumeState`` (exact
    resume), ``StepAxis`` (one step axis), ``RunSummary`` (closing line) and the step-aware bar.
    """
    import lightning.pytorch as pl
    from jsonargparse import set_parsing_settings

    # recipes write ``${trainer.default_root_dir}`` from their own root; under a subcommand the
    # merged config lives below ``fit.``, so absolute paths are read as relative to the file's root
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    # Lightning warnings that are wrong here: the version folder already holds run.json (the CLI
    # claimed it; a resumed metrics.csv is set aside and restored by ResumeState), ResumeState makes
    # the training sampler resumable, and a checkpoint after a batch's updates is what resume needs
    for message in ("Experiment logs directory .* exists and is not empty",
                    "You're resuming from a checkpoint that ended before the epoch ended",
                    "Using ModelCheckpoint with manual optimization"):
        warnings.filterwarnings("ignore", message=message)

    return _cli_class()(
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
    if argv and argv[0] == "sweep":
        from lit_reason.commands.sweep import main as sweep_main

        sys.exit(sweep_main(argv[1:]))
    if not argv or argv[0] in ("-h", "--help"):
        print("lit_reason commands: fit, validate, test (LightningCLI; `--help` after each), and")
        for name, text in EXTRA_COMMANDS.items():
            print(f"  {name:<10} {text}")
        print()
    # args=None lets LightningCLI read sys.argv itself; passing a copy of it makes Lightning warn
    # "not recommended to provide both args and command line arguments" on every run
    from lit_reason.commands.config_checks import ConfigError

    try:
        run_lightning_cli(None if from_command_line else argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
