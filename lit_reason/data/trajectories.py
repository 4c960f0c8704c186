"""Trajectory datasets on disk: the documented form of the offline methods' data (RFT, DPO, OREO ...).

A dataset is a folder written by :func:`lit_reason.data.collect.collect`::

    DIR/
      meta.json                        what the data is (below); written once, first
      shard-000000-000031.jsonl        the rows of prompts 0..31 of the split (inclusive)
      shard-000032-000063.jsonl        ...

``meta.json`` (one JSON object)::

    format            "lit_reason.trajectories"
    version           FORMAT_VERSION (1)
    policy            name of the collecting policy (an embedded name, a folder, a hub name, or
                      the name a caller gave an in-memory model)
    tokenizer         {"sha256": fingerprint of the vocabulary and EOS id, "eos_token_id": int}
    task              {"name": "arithmetic", "config": {...}}: the knobs that generate the data
                      (arithmetic: seed, num_operands, digits, operators; Hub tasks: dataset name)
    split             the task split the prompts come from
    num_prompts       prompts 0 .. num_prompts-1 of the split are covered
    prompts_sha256    fingerprint of those prompts' texts (the identity of the data, whatever its
                      source: a moved jsonl folder with the same rows still matches)
    sampling          {"samples", "temperature", "top_p", "max_new_tokens", "seed", "batch_size"}
    chunk_size        prompts per shard (the unit of work and of seeding, see below)
    splitter          {"policy", "answer_prefix", "delimiter"} of the StepSplitter used

Rows (one JSON object per line, one per trajectory; ordered by prompt, then sample)::

    prompt_index        row index of the prompt in the task split
    split               the split (as in meta)
    sample_index        0 .. samples-1 within the prompt
    prompt_ids          prompt token ids (no special tokens), as encode_prompts gives them
    response_ids        generated token ids, EOS included when generated
    step_ends           index into the response of each step's last token (ascending; the last
                        one is len(response_ids) - 1)
    reward              outcome reward from the task's grader (0 for truncated responses)
    finish              "eos", "stop" or "length" (truncated)
    behaviour_logprobs  log pi_collect(y_t | x, y_<t) per response token at the sampling
                        temperature (logits / T, full vocabulary: top_p truncation is not folded
                        in), written with 9 significant digits, exact in float32
    response            decoded response text

Writing and resuming: the prompts are processed in chunks of ``chunk_size``. A chunk's rows are
written to ``.shard-....jsonl.tmp`` and renamed, so a shard exists only complete. Sampling in each
chunk is seeded by the chunk (:func:`chunk_seed` of the dataset seed and the chunk's first prompt),
so a resumed collection skips the prompts covered by complete shards and produces exactly the
rows an uninterrupted one would. Stray ``.tmp`` files from a crash are removed on resume. A folder
whose ``meta.json`` differs from the request is refused with the differing keys (datasets are
never mixed).

Reading: :class:`TrajectoryDataset` loads the rows, checks the shards cover the prompts, and
SKIPS rows with no steps (an empty response; the sampler never writes one, but hand-made or
converted data may hold them): they are counted in ``skipped`` and reported with a warning.
:meth:`TrajectoryDataset.to_batch` turns rows into a :class:`TrajectoryBatch` for training, and
:func:`check_compatible` refuses a dataset collected with another tokenizer or task config.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from lit_reason.io import atomic_write_text
from lit_reason.rollout.batch import TrajectoryBatch

FORMAT = "lit_reason.trajectories"
FORMAT_VERSION = 1
META_NAME = "meta.json"
ROW_FIELDS = (
    "prompt_index", "split", "sample_index", "prompt_ids", "response_ids", "step_ends", "reward", "finish",
    "behaviour_logprobs", "response",
)
_SHARD_RE = re.compile(r"^shard-(\d+)-(\d+)\.jsonl$")


# ---------------------------------------------------------------------------------------------
# fingerprints and meta
# ---------------------------------------------------------------------------------------------
def _sha256(payload: Any) -> str:
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id, sorted by id) and its EOS id.

    Two tokenizers with the same fingerprint map every stored id to the same token, which is
    what stored ``prompt_ids``/``response_ids`` need.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return _sha256({"vocab": vocab, "eos_token_id": tokenizer.eos_token_id})


def task_config(task) -> dict:
    """The public knobs that generate a task's data (compared by :func:`check_compatible`).

    Arithmetic: seed, num_operands, digits, operators (the split sizes are left out: the
    prompts fingerprint in meta checks the rows themselves). Tasks over files or the Hub: the Hub
    dataset name/config when the data came from the Hub (a local folder's path is not identity:
    the prompts fingerprint is).
    """
    from lit_reason.tasks.arithmetic import ArithmeticTask
    from lit_reason.tasks.base import DatasetTask

    if isinstance(task, ArithmeticTask):
        return {"seed": task.seed, "num_operands": [task.min_operands, task.max_operands], "digits": task.digits,
                "operators": task.operators}
    if isinstance(task, DatasetTask):
        if task.path is None:
            return {"dataset": task.dataset, "dataset_config": task.dataset_config}
        return {}
    return {"repr": repr(task)}


def prompts_fingerprint(prompts: Sequence[str]) -> str:
    """sha256 of a list of prompt texts."""
    return _sha256(list(prompts))


def splitter_config(splitter) -> dict:
    """The settings of a StepSplitter, as stored in meta."""
    return {"policy": splitter.policy, "answer_prefix": splitter.answer_prefix, "delimiter": splitter.delimiter}


def chunk_seed(seed: int, first_prompt: int) -> int:
    """The sampling seed of the chunk starting at ``first_prompt`` (a hash of both, < 2**63)."""
    digest = hashlib.sha256(f"lit_reason.collect/{seed}/{first_prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def meta_differences(stored: dict, requested: dict) -> list[str]:
    """Dotted keys whose values differ between two metas, each as ``key: stored X, requested Y``."""
    a, b = _flatten(stored), _flatten(requested)
    return [f"{k}: dataset has {a.get(k, '<missing>')!r}, requested {b.get(k, '<missing>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]


def _normalise(meta: dict) -> dict:
    """The meta as it reads back from JSON (tuples become lists ...)."""
    return json.loads(json.dumps(meta))


def read_meta(path: str | os.PathLike) -> dict:
    """Reads ``DIR/meta.json``; a missing or foreign file gets an error naming the folder."""
    path = Path(path)
    file = path / META_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a trajectory dataset: it has no {META_NAME}")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{file} is not a lit_reason trajectory dataset (no format {FORMAT!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{file} has format version {meta.get('version')!r}; this lit_reason reads {FORMAT_VERSION}")
    return meta


def check_compatible(meta: dict, tokenizer, task, path: str | os.PathLike | None = None) -> None:
    """Refuses to use a dataset with another tokenizer or another task (config or prompts).

    Args:
        meta: The dataset's meta (``TrajectoryDataset.meta`` or :func:`read_meta`).
        tokenizer: The tokenizer of the model that will train on the rows.
        task: The task the training run uses.
        path: The dataset folder, named in the error.

    Raises:
        ValueError: Naming the dataset path and both fingerprints / configs.
    """
    where = f"trajectory dataset {path}" if path is not None else "trajectory dataset"
    stored_tok = meta["tokenizer"]["sha256"]
    tok = tokenizer_fingerprint(tokenizer)
    if stored_tok != tok:
        raise ValueError(
            f"{where} was collected with another tokenizer: dataset tokenizer sha256 {stored_tok}, "
            f"this tokenizer sha256 {tok}; its token ids mean other tokens here (re-collect with this policy)"
        )
    stored_task = {"name": meta["task"]["name"], "config": meta["task"]["config"]}
    this_task = _normalise({"name": task.name, "config": task_config(task)})
    if stored_task != this_task:
        raise ValueError(f"{where} was collected on another task: dataset task {stored_task}, this task {this_task}")
    split, n = meta["split"], int(meta["num_prompts"])
    examples = task.examples(split)
    if len(examples) < n:
        raise ValueError(f"{where} covers {n} prompts of split {split!r}, but this task's split has {len(examples)}")
    fp = prompts_fingerprint([task.prompt(e) for e in examples[:n]])
    if fp != meta["prompts_sha256"]:
        raise ValueError(
            f"{where} was collected on other prompts: dataset prompts sha256 {meta['prompts_sha256']}, this task's "
            f"first {n} {split!r} prompts sha256 {fp} (task {this_task})"
        )


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def shard_name(first: int, last: int) -> str:
    """File name of the shard holding prompts ``first .. last`` (inclusive)."""
    return f"shard-{first:06d}-{last:06d}.jsonl"


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_text(path, text)  # .<name>.<random>.tmp, then renamed (see remove_stray_temp_files)


def _float9(x: float) -> float:
    # 9 significant digits round-trip every float32 exactly and keep the files short
    return float(f"{x:.9g}")


def encode_row(row: dict) -> str:
    """One row as a JSON line (behaviour log-probs written with 9 significant digits)."""
    out = dict(row)
    out["behaviour_logprobs"] = [_float9(float(x)) for x in row["behaviour_logprobs"]]
    out["reward"] = float(row["reward"])
    return json.dumps(out, ensure_ascii=False)


def write_shard(folder: str | os.PathLike, first: int, last: int, rows: Sequence[dict]) -> Path:
    """Writes the rows of prompts ``first .. last`` as one shard (temp file, then rename)."""
    path = Path(folder) / shard_name(first, last)
    _atomic_write(path, "".join(encode_row(r) + "\n" for r in rows))
    return path


def complete_shards(folder: str | os.PathLike) -> dict[tuple[int, int], Path]:
    """The complete shards of a folder, ``{(first, last): path}``."""
    out = {}
    for p in Path(folder).iterdir():
        m = _SHARD_RE.match(p.name)
        if m and p.is_file():
            out[(int(m.group(1)), int(m.group(2)))] = p
    return dict(sorted(out.items()))


def remove_stray_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Deletes the ``.*.tmp`` files a crashed writer left in ``folder``; returns them."""
    removed = []
    for p in Path(folder).iterdir():
        if p.name.startswith((".shard-", f".{META_NAME}.")) and p.name.endswith(".tmp") and p.is_file():
            p.unlink()
            removed.append(p)
    return removed


def check_request(folder: str | os.PathLike, meta: dict, ignore: Sequence[str] = ()) -> None:
    """Refuses ``folder`` when it holds a dataset whose meta differs from ``meta``.

    Args:
        folder: A dataset folder (nothing is checked when it has no meta.json).
        meta: The request's meta.
        ignore: Top-level keys left out of the comparison (``collect`` checks everything but the
            tokenizer before it loads the policy, so a mismatch fails fast).

    Raises:
        ValueError: Naming the folder and each differing key with both values.
    """
    folder = Path(folder)
    if not (folder / META_NAME).exists():
        return
    stored = {k: v for k, v in read_meta(folder).items() if k not in ignore}
    diffs = meta_differences(stored, {k: v for k, v in _normalise(meta).items() if k not in ignore})
    if diffs:
        raise ValueError(
            f"output {folder} holds a trajectory dataset for another request (datasets are never mixed; "
            f"choose another --output or delete it): " + "; ".join(diffs)
        )


def prepare_output(folder: str | os.PathLike, meta: dict) -> dict[tuple[int, int], Path]:
    """Creates a dataset folder, or reopens one written for the same request (resume).

    Args:
        folder: The dataset folder.
        meta: The request's meta (see the module doc).

    Returns:
        The complete shards already there (empty for a new folder).

    Raises:
        ValueError: The folder holds a dataset for another request (the message names the
            differing keys), or other files, or shards that do not fit the chunking.
    """
    folder = Path(folder)
    meta = _normalise(meta)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / META_NAME).exists():
        check_request(folder, meta)
        remove_stray_temp_files(folder)
    else:
        remove_stray_temp_files(folder)
        others = [p.name for p in folder.iterdir()]
        if others:
            raise ValueError(f"output {folder} is not empty and has no {META_NAME}: {sorted(others)[:5]}")
        _atomic_write(folder / META_NAME, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    shards = complete_shards(folder)
    size, n = meta["chunk_size"], meta["num_prompts"]
    expected = {(s, min(s + size, n) - 1) for s in range(0, n, size)}
    unexpected = [p.name for key, p in shards.items() if key not in expected]
    if unexpected:
        raise ValueError(f"output {folder} holds shards that do not match chunk_size={size}, {n} prompts: {unexpected}")
    return shards


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row is not a JSON object")
    missing = [f for f in ROW_FIELDS if f not in row]
    if missing:
        raise ValueError(f"{where}: row lacks field(s) {missing}")
    n = len(row["response_ids"])
    if len(row["behaviour_logprobs"]) != n:
        raise ValueError(f"{where}: {len(row['behaviour_logprobs'])} behaviour_logprobs for {n} response tokens")
    ends = row["step_ends"]
    if ends and (any(b <= a for a, b in zip(ends, ends[1:])) or ends[0] < 0 or ends[-1] != n - 1):
        raise ValueError(f"{where}: step_ends {ends} are not ascending ending at the last response token ({n - 1})")


class TrajectoryDataset(torch.utils.data.Dataset):
    """The rows of a trajectory dataset folder (see the module doc), in prompt then sample order.

    Args:
        path: The dataset folder.
        require_complete: Refuse a dataset whose shards do not cover all ``num_prompts`` prompts
            (an interrupted collection; resume it with the same ``collect`` command). False opens
            what is there.

    Attributes:
        meta: The folder's meta.json.
        rows: The kept rows (dicts with the fields of the module doc).
        skipped: Rows skipped because they have no step (empty response); a warning reports them.
        covered: Prompts covered by complete shards.
    """

    def __init__(self, path: str | os.PathLike, require_complete: bool = True) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        shards = complete_shards(self.path)
        n = int(self.meta["num_prompts"])
        covered: set[int] = set()
        self.rows: list[dict] = []
        self.skipped = 0
        for (first, last), file in shards.items():
            span = set(range(first, last + 1))
            if span & covered:
                raise ValueError(f"trajectory dataset {self.path}: shard {file.name} overlaps another shard")
            covered |= span
            with file.open(encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{file}:{line_no}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{where}: not valid JSON ({err})") from err
                    _check_row(row, where)
                    if not first <= row["prompt_index"] <= last:
                        raise ValueError(
                            f"{where}: prompt_index {row['prompt_index']} outside the shard's {first}..{last}"
                        )
                    if not row["response_ids"] or not row["step_ends"]:
                        self.skipped += 1
                        continue
                    self.rows.append(row)
        self.covered = len(covered)
        missing = sorted(set(range(n)) - covered)
        if missing and require_complete:
            raise ValueError(
                f"trajectory dataset {self.path} is incomplete: {len(missing)} of {n} prompts have no shard "
                f"(first missing: {missing[0]}); resume the collection with the same command, or open it "
                "with require_complete=False"
            )
        self.rows.sort(key=lambda r: (r["prompt_index"], r["sample_index"]))
        if self.skipped:
            warnings.warn(
                f"trajectory dataset {self.path}: skipped {self.skipped} row(s) with no steps (empty response)",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    @property
    def num_prompts(self) -> int:
        """Prompts the dataset is meant to cover (``meta["num_prompts"]``)."""
        return int(self.meta["num_prompts"])

    def check_compatible(self, tokenizer, task) -> int:
        """:func:`check_compatible` for this folder; returns the number of skipped rows."""
        check_compatible(self.meta, tokenizer, task, path=self.path)
        return self.skipped

    @staticmethod
    def to_batch(rows: Sequence[dict], pad_token_id: int) -> TrajectoryBatch:
        """Builds a :class:`TrajectoryBatch` from rows.

        Prompts are left-padded, responses right-padded; ``step_ids`` is rebuilt from
        ``step_ends`` (a token belongs to the first step whose end is at or after it);
        ``group_ids`` is the prompt index, ``finished`` is ``finish != "length"`` and
        ``old_logprobs`` holds the behaviour log-probs (0 on padding).

        Raises:
            ValueError: No rows, or a row with no steps.
        """
        if not rows:
            raise ValueError("to_batch needs at least one row")
        for r in rows:
            if not r["response_ids"] or not r["step_ends"]:
                raise ValueError(f"row prompt {r['prompt_index']} sample {r['sample_index']} has no steps")
        B = len(rows)
        P = max(len(r["prompt_ids"]) for r in rows)
        L = max(len(r["response_ids"]) for r in rows)
        S = max(len(r["step_ends"]) for r in rows)
        input_ids = torch.full((B, P + L), pad_token_id, dtype=torch.long)
        attention = torch.zeros((B, P + L), dtype=torch.long)
        response_mask = torch.zeros((B, L))
        step_ids = torch.full((B, L), -1, dtype=torch.long)
        step_ends = torch.full((B, S), -1, dtype=torch.long)
        old = torch.zeros((B, L))
        for b, r in enumerate(rows):
            p, y, ends = r["prompt_ids"], r["response_ids"], r["step_ends"]
            m = len(y)
            input_ids[b, P - len(p) : P] = torch.as_tensor(p, dtype=torch.long)
            attention[b, P - len(p) : P] = 1
            input_ids[b, P : P + m] = torch.as_tensor(y, dtype=torch.long)
            attention[b, P : P + m] = 1
            response_mask[b, :m] = 1
            ends_t = torch.as_tensor(ends, dtype=torch.long)
            step_ends[b, : len(ends)] = ends_t
            step_ids[b, :m] = torch.searchsorted(ends_t, torch.arange(m), right=False)
            old[b, :m] = torch.as_tensor(r["behaviour_logprobs"], dtype=torch.float32)
        return TrajectoryBatch(
            input_ids=input_ids,
            attention_mask=attention,
            response_mask=response_mask,
            step_ids=step_ids,
            step_ends=step_ends,
            num_steps=torch.tensor([len(r["step_ends"]) for r in rows], dtype=torch.long),
            rewards=torch.tensor([float(r["reward"]) for r in rows]),
            finished=torch.tensor([r["finish"] != "length" for r in rows]),
            group_ids=torch.tensor([int(r["prompt_index"]) for r in rows], dtype=torch.long),
            prompt_len=P,
            responses=[r["response"] for r in rows],
            old_logprobs=old,
        )


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ROW_FIELDS",
    "TrajectoryDataset",
    "check_compatible",
    "check_request",
    "chunk_seed",
    "complete_shards",
    "meta_differences",
    "prepare_output",
    "prompts_fingerprint",
    "read_meta",
    "remove_stray_temp_files",
    "shard_name",
    "splitter_config",
    "task_config",
    "tokenizer_fingerprint",
    "write_shard",
]
