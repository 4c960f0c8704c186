"""Writing files and folders so that nobody ever sees them half-written.

Every writer in the library goes through these helpers:

* :func:`atomic_file` (and :func:`atomic_write_text` / :func:`atomic_write_bytes` /
  :func:`atomic_write_json` on top of it) writes to ``.<name>.<random>.tmp`` in the target's
  folder, flushes and fsyncs it, makes it world-readable (``mkstemp`` creates 0600) and renames it
  over the target. A crash leaves at most a stray ``.tmp`` file, never a truncated target.
* :func:`atomic_dir` does the same for a folder (``save_pretrained`` output, a value model): the
  caller fills a temporary sibling folder, which then replaces the target.
* :func:`build_once` builds a cached artefact (the ``embedded:arithmetic`` policy, DVPO's global
  value model) exactly once across concurrent processes: a file lock serialises the builders, the
  build runs in a temporary folder, and its result is renamed into place, so a waiting process
  finds either nothing or the complete folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Opens a temporary file beside ``path``; on a clean exit it replaces ``path``.

    Args:
        path: The target file; its folder is created if missing.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        encoding: Text encoding (ignored for binary mode).

    Yields:
        The open temporary file. If the block raises, the temporary file is removed and the
        target is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; written files are meant to be read by others
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_file(path, "w") as fh:
        fh.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically; returns the path."""
    with atomic_file(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> Path:
    """Writes ``obj`` as JSON to ``path`` atomically; ``dump_kwargs`` go to :func:`json.dump`."""
    with atomic_file(path, "w") as fh:
        json.dump(obj, fh, **dump_kwargs)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``path``; on a clean exit it becomes ``path``.

    An existing ``path`` is moved aside first and deleted after the swap, so readers see either
    the old complete folder or the new one. If the block raises, the temporary folder is
    removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_once(target: str | os.PathLike, is_complete: Callable[[Path], bool],
               build: Callable[[Path], Path]) -> Path:
    """Returns ``target``, building it with ``build`` unless it is already complete.

    Concurrent callers (parallel runs, DDP ranks) serialise on ``.<target>.lock`` beside the
    target; the first builds, the others wait and then find the finished folder.

    Args:
        target: The folder to produce.
        is_complete: Says whether a folder is a finished build (e.g. it holds ``config.json``).
        build: Called with a fresh temporary work folder beside ``target``; returns the folder
            (inside the work folder) that becomes ``target``. Everything else in the work
            folder is deleted afterwards, also when ``build`` raises.

    Returns:
        ``target``.

    Raises:
        RuntimeError: ``build`` returned a folder that ``is_complete`` rejects.
    """
    target = Path(target)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(target):  # built by another process while we waited
            return target
        work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.build-"))
        try:
            result = Path(build(work))
            if not is_complete(result):
                raise RuntimeError(f"building {target} produced no complete result in {result}")
            if target.exists():  # an incomplete leftover of a killed build (no lock held now)
                shutil.rmtree(target)
            os.replace(result, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target
