"""The ``collect`` stage: trajectory datasets on disk, resuming, compatibility checks, ``to_batch``, CLI.

In-process tests use the session's tiny model with a logit bias towards newline and EOS (a forward
hook on a copy), so that the collected responses have several steps and some finish.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lit_reason.data.collect import collect, dataset_summary
from lit_reason.data.trajectories import (
    ROW_FIELDS,
    TrajectoryDataset,
    check_compatible,
    chunk_seed,
    read_meta,
    tokenizer_fingerprint,
)
from lit_reason.models.logprobs import response_logprobs
from lit_reason.rollout.sampler import RolloutEngine
from lit_reason.rollout.trajectories import build_batch, encode_prompts
from lit_reason.steps import StepSplitter
from lit_reason.tasks import get_task
from helpers import biased_copy

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK_KW = {"n_train": 40, "n_validation": 8, "n_test": 8}
RUN = {"samples": 3, "limit": 8, "max_new_tokens": 12, "chunk_size": 3, "temperature": 0.8, "seed": 5,
       "progress": False}

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def task():
    return get_task("arithmetic", **TASK_KW)


@pytest.fixture(scope="module")
def policy(tiny_model, tiny_tokenizer):
    return biased_copy(tiny_model, tiny_tokenizer, newline=4.0, eos=2.5), tiny_tokenizer


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, policy, task):
    """One uninterrupted collection, shared by the module."""
    out = tmp_path_factory.mktemp("collect") / "full"
    collect(policy, task, out, policy_name="biased-tiny", **RUN)
    return out


def shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "meta.json")


def test_collect_writes_shards_meta_and_documented_rows(reference_dir, policy, task):
    model, tok = policy
    assert shard_names(reference_dir) == ["shard-000000-000002.jsonl", "shard-000003-000005.jsonl",
                                          "shard-000006-000007.jsonl"]
    meta = read_meta(reference_dir)
    assert meta["policy"] == "biased-tiny" and meta["split"] == "train" and meta["num_prompts"] == 8
    assert meta["task"] == {"name": "arithmetic", "config": {"seed": 0, "num_operands": [3, 6], "digits": 1,
                                                             "operators": "+-"}}
    assert meta["sampling"] == {"samples": 3, "temperature": 0.8, "top_p": 1.0, "max_new_tokens": 12, "seed": 5,
                                "batch_size": 64}
    assert meta["tokenizer"]["sha256"] == tokenizer_fingerprint(tok)
    assert meta["splitter"] == {"policy": "newline", "answer_prefix": "Answer:", "delimiter": "\n"}

    ds = TrajectoryDataset(reference_dir)
    assert len(ds) == 24 and ds.skipped == 0
    assert [(r["prompt_index"], r["sample_index"]) for r in ds] == [(p, s) for p in range(8) for s in range(3)]
    splitter = StepSplitter("newline", answer_prefix="Answer:")
    examples = task.examples("train")
    for r in ds:
        assert set(ROW_FIELDS) <= set(r)
        assert r["prompt_ids"] == encode_prompts(tok, [task.prompt(examples[r["prompt_index"]])])[0]
        text, _, ends = splitter.token_steps(tok, r["response_ids"])
        assert r["response"] == text and r["step_ends"] == ends
        assert len(r["behaviour_logprobs"]) == len(r["response_ids"]) <= 12
        assert r["finish"] in ("eos", "length")
        assert (r["finish"] == "eos") == (r["response_ids"][-1] == tok.eos_token_id)
        if r["finish"] == "length":
            assert r["reward"] == 0.0
        else:
            assert r["reward"] == task.reward(text, examples[r["prompt_index"]])
    # the bias makes the rows interesting: several steps, both finish kinds
    assert max(len(r["step_ends"]) for r in ds) >= 3
    assert {r["finish"] for r in ds} == {"eos", "length"}

    # behaviour log-probs = the policy's log-probs at the sampling temperature, recomputed
    batch = TrajectoryDataset.to_batch(ds.rows, tok.pad_token_id)
    with torch.no_grad():
        model.eval()
        again = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_len, temperature=0.8)
        at_t1 = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_len, temperature=1.0)
    mask = batch.response_mask.bool()
    assert torch.allclose(batch.old_logprobs[mask], again[mask], atol=1e-5)
    assert not torch.allclose(batch.old_logprobs[mask], at_t1[mask], atol=1e-3)


def test_to_batch_matches_rows_and_a_fresh_rollout(reference_dir, policy, task):
    model, tok = policy
    ds = TrajectoryDataset(reference_dir)
    rows = ds.rows
    batch = TrajectoryDataset.to_batch(rows, tok.pad_token_id)
    assert len(batch) == len(rows)
    for b, r in enumerate(rows):
        m, ends = len(r["response_ids"]), r["step_ends"]
        assert batch.response_ids[b, :m].tolist() == r["response_ids"]
        assert batch.response_mask[b].sum() == m
        assert batch.prompt_ids[b, batch.prompt_len - len(r["prompt_ids"]) :].tolist() == r["prompt_ids"]
        assert batch.step_ends[b, : len(ends)].tolist() == ends and (batch.step_ends[b, len(ends) :] == -1).all()
        assert batch.num_steps[b] == len(ends)
        # step k owns the tokens (ends[k-1], ends[k]]
        expected = [next(k for k, e in enumerate(ends) if t <= e) for t in range(m)]
        assert batch.step_ids[b, :m].tolist() == expected and (batch.step_ids[b, m:] == -1).all()
        assert batch.rewards[b] == r["reward"] and batch.group_ids[b] == r["prompt_index"]
        assert bool(batch.finished[b]) == (r["finish"] != "length")
        assert batch.responses[b] == r["response"]

    # chunk 0 re-sampled with its seed through the rollout code gives the same batch
    examples = task.examples("train")[:3]
    prompts = [task.prompt(e) for e in examples]
    prompt_ids = encode_prompts(tok, prompts)
    engine = RolloutEngine(model, tok, max_new_tokens=12, temperature=0.8, batch_size=64)
    engine.reseed(chunk_seed(5, 0))
    fresh = build_batch(tok, StepSplitter("newline", answer_prefix="Answer:"), task, prompt_ids, prompts, examples,
                        engine.sample(prompt_ids, 3), 3)
    stored = TrajectoryDataset.to_batch(rows[:9], tok.pad_token_id)
    for name in ("input_ids", "attention_mask", "response_mask", "step_ids", "step_ends", "num_steps", "rewards",
                 "finished", "group_ids"):
        assert torch.equal(getattr(stored, name), getattr(fresh, name)), name


def test_to_batch_hand_made_rows():
    rows = [
        {"prompt_index": 4, "split": "train", "sample_index": 0, "prompt_ids": [7, 8], "response_ids": [1, 2, 3, 4, 5],
         "step_ends": [1, 2, 4], "reward": 1.0, "finish": "eos", "behaviour_logprobs": [-1, -2, -3, -4, -5],
         "response": "x"},
        {"prompt_index": 9, "split": "train", "sample_index": 1, "prompt_ids": [6, 7, 8], "response_ids": [9, 9],
         "step_ends": [1], "reward": 0.0, "finish": "length", "behaviour_logprobs": [-0.5, -0.25], "response": "y"},
    ]
    b = TrajectoryDataset.to_batch(rows, pad_token_id=0)
    assert b.prompt_len == 3
    assert b.input_ids.tolist() == [[0, 7, 8, 1, 2, 3, 4, 5], [6, 7, 8, 9, 9, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert b.step_ids.tolist() == [[0, 0, 1, 2, 2], [0, 0, -1, -1, -1]]
    assert b.step_ends.tolist() == [[1, 2, 4], [1, -1, -1]]
    assert b.num_steps.tolist() == [3, 1] and b.rewards.tolist() == [1.0, 0.0]
    assert b.finished.tolist() == [True, False] and b.group_ids.tolist() == [4, 9]
    assert b.old_logprobs.tolist() == [[-1, -2, -3, -4, -5], [-0.5, -0.25, 0, 0, 0]]
    with pytest.raises(ValueError, match="no steps"):
        TrajectoryDataset.to_batch([dict(rows[0], response_ids=[], step_ends=[], behaviour_logprobs=[])], 0)


class Interrupt(Exception):
    pass


def test_interrupted_collection_resumes_to_the_same_dataset(tmp_path, reference_dir, policy, task):
    out = tmp_path / "resumed"
    written = []

    def crash_after_first_shard(path):
        written.append(path.name)
        raise Interrupt  # the process dies between chunk 0 and chunk 1

    with pytest.raises(Interrupt):
        collect(policy, task, out, policy_name="biased-tiny", on_shard=crash_after_first_shard, **RUN)
    assert shard_names(out) == ["shard-000000-000002.jsonl"] == written
    # an interrupted dataset is refused unless asked for, with the way out named
    with pytest.raises(ValueError, match="incomplete.*resume"):
        TrajectoryDataset(out)
    partial = TrajectoryDataset(out, require_complete=False)
    assert len(partial) == 9 and partial.covered == 3
    # a crash in the middle of writing chunk 1 leaves a temp file behind
    stray = out / ".shard-000003-000005.jsonl.k2j4.tmp"
    stray.write_text('{"prompt_index": 3, "split": "tr')

    collect(policy, task, out, policy_name="biased-tiny", **RUN)  # resume
    assert shard_names(out) == shard_names(reference_dir)  # no temp file left
    for name in shard_names(out):
        assert (out / name).read_bytes() == (reference_dir / name).read_bytes(), name
    assert TrajectoryDataset(out).rows == TrajectoryDataset(reference_dir).rows

    # resuming a complete dataset samples nothing and changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    collect(policy, task, out, policy_name="biased-tiny", on_shard=crash_after_first_shard, **RUN)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_mismatching_request_is_refused_naming_the_keys(tmp_path, reference_dir, policy, task):
    out = tmp_path / "copy"
    shutil.copytree(reference_dir, out)
    with pytest.raises(ValueError, match=r"sampling\.temperature: dataset has 0.8, requested 0.7"):
        collect(policy, task, out, policy_name="biased-tiny", **{**RUN, "temperature": 0.7})
    with pytest.raises(ValueError, match=r"policy: dataset has 'biased-tiny', requested 'other'") as err:
        collect(policy, task, out, policy_name="other", **{**RUN, "samples": 4})
    assert "sampling.samples" in str(err.value)
    other_task = get_task("arithmetic", seed=1, **TASK_KW)
    with pytest.raises(ValueError, match=r"task\.config\.seed"):
        collect(policy, other_task, out, policy_name="biased-tiny", **RUN)
    with pytest.raises(ValueError, match="num_prompts"):
        collect(policy, task, out, policy_name="biased-tiny", **{**RUN, "limit": 9})
    assert shard_names(out) == shard_names(reference_dir)  # nothing written
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        collect(policy, task, foreign, **RUN)


def test_other_tokenizer_or_task_config_is_refused(reference_dir, tiny_tokenizer, task):
    from lit_reason.models.tiny import build_tokenizer

    ds = TrajectoryDataset(reference_dir)
    assert ds.check_compatible(tiny_tokenizer, task) == 0  # compatible; no row skipped
    # the same task with a larger train split shares the first prompts: still compatible
    ds.check_compatible(tiny_tokenizer, get_task("arithmetic", **{**TASK_KW, "n_train": 60}))

    other_tok = build_tokenizer(vocab_size=300)
    with pytest.raises(ValueError, match="another tokenizer") as err:
        ds.check_compatible(other_tok, task)
    msg = str(err.value)
    assert str(reference_dir) in msg
    assert tokenizer_fingerprint(tiny_tokenizer) in msg and tokenizer_fingerprint(other_tok) in msg

    with pytest.raises(ValueError, match="another task") as err:
        check_compatible(ds.meta, tiny_tokenizer, get_task("arithmetic", seed=1, **TASK_KW), path=reference_dir)
    assert "'seed': 0" in str(err.value) and "'seed': 1" in str(err.value) and str(reference_dir) in str(err.value)
    with pytest.raises(ValueError, match="another task"):
        ds.check_compatible(tiny_tokenizer, get_task("arithmetic", digits=2, **TASK_KW))
    # same knobs, other rows (the test split is drawn first, so its size moves train)
    with pytest.raises(ValueError, match="other prompts"):
        ds.check_compatible(tiny_tokenizer, get_task("arithmetic", **{**TASK_KW, "n_test": 9}))


def test_rows_without_steps_are_counted_skipped_and_reported(tmp_path, reference_dir, tiny_tokenizer, task):
    out = tmp_path / "with_empty"
    shutil.copytree(reference_dir, out)
    shard = out / "shard-000000-000002.jsonl"
    empty = {**json.loads(shard.read_text().splitlines()[0]), "sample_index": 3, "response_ids": [],
             "step_ends": [], "behaviour_logprobs": [], "response": ""}
    with shard.open("a") as f:
        f.write(json.dumps(empty) + "\n")
    with pytest.warns(UserWarning, match="skipped 1 row"):
        ds = TrajectoryDataset(out)
    assert len(ds) == 24 and ds.skipped == 1
    assert ds.check_compatible(tiny_tokenizer, task) == 1
    with pytest.warns(UserWarning):
        assert dataset_summary(out)["skipped"] == 1
    # a broken row is an error naming the file and line, never skipped
    shard.write_text(shard.read_text() + '{"prompt_index": 0}\n')
    with pytest.raises(ValueError, match=r"shard-000000-000002\.jsonl:11: row lacks field"):
        TrajectoryDataset(out)


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def cli_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update({"LIT_REASON_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1"})
    return env


def cli_args(policy_dir: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lit_reason", "collect", "--policy", policy_dir, "--task", "arithmetic",
            "--limit", "12", "--samples", "2", "--max-new-tokens", "8", "--chunk-size", "1", "--output", str(out),
            *extra]


@pytest.mark.slow
def test_cli_collects_resumes_after_a_kill_and_refuses_a_mismatch(tmp_path, tiny_policy_dir, tiny_tokenizer):
    env = cli_env(tmp_path)
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = subprocess.run(cli_args(tiny_policy_dir, full), cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("rows", "prompts", "mean reward", "fraction finished", "rows skipped"):
        assert key in proc.stdout
    assert "24" in proc.stdout  # 12 prompts x 2 samples
    assert len(shard_names(full)) == 12
    meta = read_meta(full)
    assert meta["policy"] == tiny_policy_dir and meta["task"]["config"]["seed"] == 0
    assert meta["tokenizer"]["sha256"] == tokenizer_fingerprint(tiny_tokenizer)

    # a real interruption: kill the process once its first shard is on disk
    runner = subprocess.Popen(cli_args(tiny_policy_dir, killed), cwd=REPO_ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and runner.poll() is None:
        if killed.is_dir() and any(p.name.startswith("shard-") for p in killed.iterdir()):
            runner.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    runner.wait(timeout=60)
    done_before = len([n for n in shard_names(killed) if n.startswith("shard-")])
    assert 1 <= done_before < 12, done_before
    proc = subprocess.run(cli_args(tiny_policy_dir, killed), cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard_names(killed) == shard_names(full)  # no temp files
    for name in shard_names(full):
        assert (killed / name).read_bytes() == (full / name).read_bytes(), name

    # a mismatching rerun into the same folder fails with one line naming the key
    proc = subprocess.run(cli_args(tiny_policy_dir, full, "--temperature", "0.5"), cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line: refused before loading weights
    assert proc.stderr.startswith("error:") and "sampling.temperature: dataset has 1.0, requested 0.5" in proc.stderr
