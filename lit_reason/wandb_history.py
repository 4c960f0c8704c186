"""Reads the history rows of an offline W&B run file (``run-<id>.wandb``) without W&B's sync:
what a killed run left on disk (``tests/test_resume.py``, ``benchmarks/wandb_kill_loss.py``).

The file is W&B's record log: a 7-byte header, then 32 KiB blocks of LevelDB-log records
(checksum u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last), each record a
``wandb_internal.Record`` protobuf. Only the ``history`` records are decoded, as dicts.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HEADER = 7
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """Yields the raw bytes of each complete record in ``path`` (a torn tail is ignored)."""
    data = path.read_bytes()
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def history(path: Path) -> list[dict]:
    """The history rows of one offline run file, each ``{key: value}`` (``_step`` included)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if record.history.HasField("step"):
                row.setdefault("_step", record.history.step.num)
            rows.append(row)
    return rows
