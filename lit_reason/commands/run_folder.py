"""Run folders that cannot collide, and which folder and W&B run a resumed fit continues.

Layout under ``trainer.default_root_dir`` (the CSV logger's ``save_dir``/``name``)::

    csv/version_N/metrics.csv, config.yaml, run.json, checkpoints/{last,step=...}.ckpt, calibration/
    wandb/offline-run-<time>-<id>/

* A fresh fit claims ``version_N`` by creating the folder (``mkdir`` is atomic), so two fits started
  at once into one root get two folders; Lightning's own "next free number" would give both the same.
* ``run.json`` in the version folder records the W&B run id (generated here, so it is known before
  W&B starts) and the process that holds the folder.
* ``--ckpt_path`` pointing into ``csv/version_N/checkpoints/`` (or ``last``: the newest
  ``last.ckpt`` under the root) resumes *in* ``version_N`` and continues its W&B run id.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import string
from pathlib import Path
from typing import Any

from lit_reason.commands.config_checks import ConfigError, check_checkpoint_file
from lit_reason.io import atomic_write_json

RUN_FILE = "run.json"
_VERSION = re.compile(r"^version_(\d+)$")


def new_wandb_id() -> str:
    """An 8-character W&B run id (the alphabet and length W&B uses)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def claim_version(csv_dir: Path) -> int:
    """Creates and returns the next free ``version_N`` under ``csv_dir`` (safe against concurrent fits)."""
    csv_dir.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in csv_dir.iterdir() if (m := _VERSION.match(p.name))]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (csv_dir / f"version_{n}").mkdir()
            return n
        except FileExistsError:  # another fit took it between listing and mkdir
            n += 1


def checkpoint_version(ckpt: Path, csv_dir: Path) -> int | None:
    """``N`` when ``ckpt`` is ``<csv_dir>/version_N/checkpoints/<file>``, else None."""
    ckpt = ckpt.resolve()
    if ckpt.parent.name != "checkpoints" or ckpt.parent.parent.parent != csv_dir.resolve():
        return None
    m = _VERSION.match(ckpt.parent.parent.name)
    return int(m.group(1)) if m else None


def find_last_checkpoint(csv_dirs: list[Path]) -> Path:
    """The most recently written ``version_*/checkpoints/last.ckpt`` under the CSV folders."""
    found = [p for d in csv_dirs for p in d.glob("version_*/checkpoints/last.ckpt")]
    if not found:
        where = ", ".join(str(d / "version_*/checkpoints/last.ckpt") for d in csv_dirs) or "the run folder"
        raise ConfigError(f"ckpt_path=last: no checkpoint at {where}; checkpoints are written when "
                          f"callbacks/checkpoint.yaml is appended (--config callbacks/checkpoint.yaml)")
    return max(found, key=lambda p: p.stat().st_mtime)


def read_run_file(version_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((version_dir / RUN_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_run_file(version_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_json(version_dir / RUN_FILE, info, indent=1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_not_held(version_dir: Path) -> None:
    """Refuses a version folder that a live process on this host is writing."""
    info = read_run_file(version_dir)
    pid, host = info.get("pid"), info.get("host")
    if pid and host == socket.gethostname() and pid != os.getpid() and _pid_alive(int(pid)):
        raise ConfigError(f"run folder {version_dir} is held by a running fit (pid {pid}); wait for it, "
                          f"or leave the logger's version unset so this fit gets its own folder")


# ------------------------------------------------------------------------- config plumbing
def _loggers(trainer: Any) -> list[Any]:
    value = trainer.get("logger") if trainer is not None else None
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _kind(logger: Any) -> str:
    return str(logger.get("class_path", "") if hasattr(logger, "get") else "").rsplit(".", 1)[-1]


def _csv_dir(logger: Any, root: str) -> Path:
    args = logger.get("init_args") or {}
    save_dir = args.get("save_dir") or root
    name = args.get("name", "lightning_logs")
    return Path(save_dir) / name if name else Path(save_dir)


def resolve_ckpt_path(cfg: Any) -> None:
    """Turns ``ckpt_path: last`` into the newest ``last.ckpt`` of this root and checks the file."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt or ckpt in ("best", "hpc", "registry"):
        return
    if ckpt == "last":
        root = cfg["trainer"].get("default_root_dir") or "."
        csv_dirs = [_csv_dir(lg, root) for lg in _loggers(cfg["trainer"]) if _kind(lg) == "CSVLogger"]
        cfg["ckpt_path"] = ckpt = str(find_last_checkpoint(csv_dirs))
    check_checkpoint_file(ckpt)


def prepare_run_folder(cfg: Any) -> dict[str, Any]:
    """Pins the CSV version and the W&B run id of a ``fit`` config (in place); returns ``run.json``'s content.

    Fresh fit: a new version folder and W&B id. Resume from a checkpoint inside a version folder:
    that folder and the W&B id recorded in its ``run.json``.
    """
    trainer = cfg["trainer"]
    root = trainer.get("default_root_dir") or "."
    loggers = _loggers(trainer)
    csv_loggers = [lg for lg in loggers if _kind(lg) == "CSVLogger"]
    wandb_loggers = [lg for lg in loggers if _kind(lg) == "WandbLogger"]
    ckpt = cfg.get("ckpt_path")
    info: dict[str, Any] = {}
    version_dir = None
    if csv_loggers:
        logger = csv_loggers[0]
        args = logger["init_args"]
        csv_dir = _csv_dir(logger, root)
        resumed = checkpoint_version(Path(ckpt), csv_dir) if ckpt and Path(ckpt).is_file() else None
        if resumed is not None:
            args["version"] = resumed
            version_dir = csv_dir / f"version_{resumed}"
            info = read_run_file(version_dir)
            check_not_held(version_dir)
            from lit_reason.callbacks.resume import set_aside_metrics

            set_aside_metrics(version_dir)
        elif args.get("version") is None:
            args["version"] = claim_version(csv_dir)
            version_dir = csv_dir / f"version_{args['version']}"
        else:
            version = args["version"]
            version_dir = csv_dir / (version if isinstance(version, str) else f"version_{version}")
            check_not_held(version_dir)
        for other in csv_loggers[1:]:
            other["init_args"]["version"] = args["version"]
    wandb_id = info.get("wandb_id")
    for logger in wandb_loggers:
        args = logger["init_args"]
        if args.get("id") or args.get("version"):
            wandb_id = args.get("id") or args.get("version")
        wandb_id = wandb_id or new_wandb_id()
        args["id"] = wandb_id
    info.update({"wandb_id": wandb_id, "pid": os.getpid(), "host": socket.gethostname()})
    if ckpt:
        info.setdefault("resumed_from", []).append(str(ckpt))
    if version_dir is not None:
        write_run_file(version_dir, info)
    return info
