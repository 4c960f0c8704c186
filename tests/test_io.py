"""The atomic writers and the build-once helper of lit_reason/io.py (concurrency: test_embedded_cache.py)."""

from __future__ import annotations

import json
import stat

import pytest

from lit_reason.io import atomic_dir, atomic_file, atomic_write_json, atomic_write_text, build_once


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2}, indent=1)
    assert json.loads(path.read_text()) == {"x": 2}
    assert names(path.parent) == ["a.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by others, unlike mkstemp's 0600


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(path) as fh:
            fh.write("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and names(tmp_path) == ["a.txt"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_file(path, "a"):
            pass


def test_atomic_dir_swaps_a_whole_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    with atomic_dir(target) as tmp:
        (tmp / "v.bin").write_bytes(b"2")
    assert names(target) == ["v.bin"] and names(tmp_path) == ["model"]  # old content gone, no leftovers
    with pytest.raises(OSError):
        with atomic_dir(target) as tmp:
            (tmp / "partial").write_bytes(b"3")
            raise OSError("killed")
    assert names(target) == ["v.bin"] and names(tmp_path) == ["model"]


def test_build_once_builds_then_reuses_and_cleans_up_failures(tmp_path):
    calls = []

    def build(work):
        calls.append(work)
        (work / "out").mkdir()
        (work / "out" / "done").write_text("ok")
        (work / "scratch").write_text("deleted with the work folder")
        return work / "out"

    complete = lambda p: (p / "done").is_file()  # noqa: E731
    target = tmp_path / "cache" / "thing"
    assert build_once(target, complete, build) == target
    assert build_once(target, complete, build) == target  # complete: not rebuilt
    assert len(calls) == 1 and (target / "done").read_text() == "ok"
    assert names(target.parent) == [".thing.lock", "thing"]

    other = tmp_path / "cache" / "broken"
    with pytest.raises(RuntimeError, match="no complete result"):
        build_once(other, complete, lambda work: work)  # returns a folder without `done`
    assert not other.exists() and not [n for n in names(other.parent) if ".build-" in n]
