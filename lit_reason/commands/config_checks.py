"""Checks of a parsed ``fit``/``validate``/``test`` config that run before any class is built.

Building the start policy takes seconds to minutes (the first use of ``embedded:arithmetic``
trains it), and the Trainer is built after the model, so a bad trainer setting or a typo in a
task name would otherwise surface late and as a long traceback. Each check raises
:class:`ConfigError` with one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

# model arguments that count something and must be >= 1 (every method's constructor agrees)
POSITIVE_INT_ARGS = (
    "prompts_per_iteration", "samples_per_prompt", "epochs_per_iteration", "minibatch_size", "mc_rollouts",
    "batch_size", "rollout_batch_size", "max_new_tokens", "eval_limit",
)


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key and the fix."""


def _get(ns: Any, key: str, default: Any = None) -> Any:
    if ns is None:
        return default
    if isinstance(ns, dict):
        return ns.get(key, default)
    return getattr(ns, key, default) if not hasattr(ns, "get") else ns.get(key, default)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_trainer(trainer: Any) -> None:
    """Trainer settings Lightning would only reject after the model is built."""
    max_steps = _get(trainer, "max_steps")
    if max_steps is not None and (not _is_int(max_steps) or max_steps < -1):
        raise ConfigError(f"trainer.max_steps must be -1 (no limit) or an integer >= 0 (optimiser steps), got {max_steps!r}")
    max_epochs = _get(trainer, "max_epochs")
    if max_epochs is not None and (not _is_int(max_epochs) or max_epochs < -1):
        raise ConfigError(f"trainer.max_epochs must be None, -1 (no limit) or an integer >= 0, got {max_epochs!r}")
    for key in ("min_steps", "min_epochs"):
        value = _get(trainer, key)
        if value is not None and (not _is_int(value) or value < 0):
            raise ConfigError(f"trainer.{key} must be None or an integer >= 0, got {value!r}")
    every = _get(trainer, "log_every_n_steps")
    if every is not None and (not _is_int(every) or every < 0):
        raise ConfigError(f"trainer.log_every_n_steps must be an integer >= 0 (0: no step logging), got {every!r}")
    accelerator = _get(trainer, "accelerator")
    known = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
    if isinstance(accelerator, str) and accelerator not in known:
        raise ConfigError(f"trainer.accelerator must be one of {', '.join(known)}, got {accelerator!r}")


def check_task(task: Any) -> None:
    """``model.init_args.task``: a known task name, or ``{name: ..., **kwargs}``."""
    from lit_reason.tasks import TASKS

    known = ", ".join(sorted(TASKS))
    if isinstance(task, (list, tuple)):
        # `--model.init_args.task.name X` on a free-form argument arrives as the list [name, X]
        pairs = zip(task[::2], task[1::2]) if len(task) % 2 == 0 else [("name", "...")]
        shown = "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"
        raise ConfigError(
            f"model.init_args.task got {list(task)!r}: a dotted override (--model.init_args.task.KEY) replaces "
            f"the whole task; pass it whole, e.g. --model.init_args.task '{shown}' (known tasks: {known})")
    name = task if isinstance(task, str) else _get(task, "name")
    if name is None and task is not None and not isinstance(task, (str, dict)) and not hasattr(task, "get"):
        return  # a Task instance given in Python
    if not isinstance(name, str) or name not in TASKS:
        raise ConfigError(f"model.init_args.task: unknown task {name!r}; known tasks: {known}")


def check_policy(policy: Any, key: str = "model.init_args.policy") -> None:
    """A policy folder that is named like a path must exist and hold a ``save_pretrained`` model."""
    if not isinstance(policy, str):
        return
    if policy.startswith("embedded:"):
        from lit_reason.models.loading import EMBEDDED_NAMES

        if policy not in EMBEDDED_NAMES:
            raise ConfigError(f"{key}: unknown embedded policy {policy!r}; known: {', '.join(EMBEDDED_NAMES)}")
        return
    from lit_reason.models import gguf

    if gguf.is_gguf_name(policy):  # a .gguf file or an alias (smollm2:135m-instruct); the loader checks the rest
        try:
            if policy.lower().endswith(".gguf"):
                if not Path(policy).expanduser().is_file():
                    raise FileNotFoundError(f"GGUF file {policy} does not exist")
            else:
                gguf.alias_file(policy)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"{key}: {err}") from err
        return
    path = Path(policy).expanduser()
    # a hub name is `org/name`; anything absolute, relative (./, ../), deeper or existing is a folder
    looks_local = path.is_absolute() or policy.startswith(".") or policy.count("/") != 1 or path.exists()
    if not looks_local:
        return
    if not path.is_dir():
        raise ConfigError(f"{key}: policy folder {policy} does not exist (give a save_pretrained folder, "
                          f"embedded:arithmetic, embedded:tiny or a hub name org/name)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: policy folder {policy} has no config.json (not a save_pretrained folder)")


def check_model(model: Any) -> None:
    """The start policy, the task and the counting arguments of ``model.init_args``."""
    args = _get(model, "init_args")
    if args is None:
        return
    for name in POSITIVE_INT_ARGS:
        value = _get(args, name)
        if value is not None and (not _is_int(value) or value < 1):
            raise ConfigError(f"model.init_args.{name} must be an integer >= 1, got {value!r}")
    if _get(args, "task") is not None:
        check_task(_get(args, "task"))
    check_policy(_get(args, "policy"))


def check_checkpoint_file(path: str | Path) -> None:
    """A ``--ckpt_path`` file must exist and be a complete torch zip archive (truncation is named)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path: checkpoint {path} does not exist")
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ConfigError(f"ckpt_path: checkpoint {path} is truncated or not a torch checkpoint ({size} bytes: "
                          f"{err}); resume from another file in {path.parent}") from None
    if not any(n.endswith("data.pkl") for n in names):
        raise ConfigError(f"ckpt_path: {path} is a zip file but not a torch checkpoint (no data.pkl)")


def check_config(cfg: Any) -> None:
    """All checks on one subcommand's parsed config (a jsonargparse Namespace)."""
    check_trainer(_get(cfg, "trainer"))
    check_model(_get(cfg, "model"))
