"""Target datasets of DVO: per-step value-difference targets from MCTS, an outcome value model, or
Monte Carlo estimates (docs/dvo.md), built on first use and stored like trajectory datasets.

See :mod:`lit_reason.methods.dvo` for the sources.

The target dataset (built on first use)
---------------------------------------
A trajectory dataset folder (:mod:`lit_reason.data.trajectories`: ``meta.json`` and
``shard-*.jsonl``), so every offline tool reads it, whose rows carry ``step_targets`` (T floats,
+-1 scale) next to the usual fields; ``meta.json`` adds ``targets`` (the source and its settings).
Extra files::

    trees-FIRST-LAST.json   (mcts) the chunk's searched trees (lit_reason.rollout.mcts.save_trees),
                            written before the chunk's shard, with the search and extraction stats
    samples/                (value_model, mc) the collected trajectory dataset
    value_model/            (value_model) the trained outcome value model (ValueModel.save)

It mirrors the collection conventions: prompts are processed in chunks of ``chunk_size``, each
seeded by ``chunk_seed(seed, first prompt)``; a chunk's shard appears only complete (temp file and
rename), so an interrupted build resumes from the complete shards (a chunk whose trees file exists
is re-extracted from it, and a partially searched tree continues its search); a complete folder is
reused; a folder built for other settings is refused naming the differing keys.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Sequence

import torch

from lit_reason.losses.dvo import targets_from_values

__all__ = ["TARGET_SOURCES", "build_target_dataset", "check_target_settings", "target_dataset_stats",
           "train_outcome_value_model"]

TARGET_SOURCES = ("mcts", "value_model", "mc")
_COMMON = {"split": "train", "limit": None, "seed": 0, "chunk_size": 64, "batch_size": 256, "temperature": 1.0,
           "max_correct": 8, "max_incorrect": 8}
_SOURCE_DEFAULTS = {
    "mcts": {"simulations": 80, "width": 5, "c_puct": 1.5, "max_depth": 8, "leaves_per_tree": 1},
    "value_model": {"samples": 8, "value_epochs": 2, "value_lr": 1e-4, "value_batch_size": 32},
    "mc": {"samples": 8, "mc_rollouts": 8},
}


def check_target_settings(source: str, settings: dict | None) -> dict:
    """The full settings of a target source: ``settings`` over the defaults (docs/dvo.md).

    Common keys: ``split`` (train), ``limit`` (prompts; None = the whole split), ``seed``,
    ``chunk_size`` (prompts per shard, 64), ``batch_size`` (sequences decoded together, 256),
    ``temperature`` (1.0), ``max_correct`` / ``max_incorrect`` (8 / 8 responses per prompt).
    ``mcts``: ``simulations`` (80), ``width`` (5), ``c_puct`` (1.5), ``max_depth`` (8),
    ``leaves_per_tree`` (1; > 1 expands several leaves of a tree per batched wave, with a virtual
    loss). ``value_model``: ``samples`` (8 per prompt), ``value_epochs`` (2), ``value_lr`` (1e-4),
    ``value_batch_size`` (32). ``mc``: ``samples`` (8), ``mc_rollouts`` (8 per state).

    Raises:
        ValueError: An unknown source, or a key unknown to the source (both named).
    """
    if source not in TARGET_SOURCES:
        raise ValueError(f"target_source must be one of {list(TARGET_SOURCES)}, got {source!r}")
    if settings is not None and not isinstance(settings, dict):
        raise TypeError(f"targets must be a dict of settings or None, got {type(settings).__name__}")
    known = {**_COMMON, **_SOURCE_DEFAULTS[source]}
    unknown = set(settings or {}) - set(known)
    if unknown:
        raise ValueError(f"targets: unknown key(s) {sorted(unknown)} for target_source={source!r}; "
                         f"known: {sorted(known)}")
    out = {**known, **(settings or {})}
    for key in ("chunk_size", "batch_size", "simulations", "width", "max_depth", "leaves_per_tree", "samples",
                "mc_rollouts", "value_epochs", "value_batch_size"):
        if key in out and (not isinstance(out[key], int) or out[key] < 1):
            raise ValueError(f"targets: {key} must be an int >= 1, got {out[key]!r}")
    for key in ("max_correct", "max_incorrect"):
        if not isinstance(out[key], int) or out[key] < 0:
            raise ValueError(f"targets: {key} must be an int >= 0, got {out[key]!r}")
    if out["limit"] is not None and out["limit"] < 1:
        raise ValueError(f"targets: limit must be >= 1 or None, got {out['limit']!r}")
    if not out["temperature"] > 0:
        raise ValueError(f"targets: temperature must be > 0, got {out['temperature']!r}")
    return out


# ---------------------------------------------------------------------------------------------
# building the target dataset
# ---------------------------------------------------------------------------------------------
def _trees_name(first: int, last: int) -> str:
    return f"trees-{first:06d}-{last:06d}.json"


def build_target_dataset(policy, tokenizer, task, splitter, output: str | Path, source: str, settings: dict,
                         max_new_tokens: int = 96, policy_name: str = "<in-memory>",
                         progress: bool = True) -> Path:
    """Builds (or resumes, or reuses) a DVO target dataset in ``output`` (format: module doc).

    Args:
        policy: The policy searched / sampled with (a causal LM, used as is: eval mode inside).
        tokenizer: Its tokenizer.
        task: The task (prompts, grader).
        splitter: The StepSplitter of the run (recorded in meta, checked by the trainer).
        output: The dataset folder.
        source: ``mcts``, ``value_model`` or ``mc``.
        settings: Source settings (:func:`check_target_settings` fills the defaults).
        max_new_tokens: Length limit of a response (and of one MCTS step).
        policy_name: Name recorded in meta (a resume must match it).
        progress: Progress bar over chunks.

    Returns:
        ``output``.

    Raises:
        ValueError: Bad settings, or ``output`` holds a dataset for another request.
    """
    from tqdm.auto import tqdm

    from lit_reason.data import trajectories as td
    from lit_reason.rollout.trajectories import encode_prompts

    s = check_target_settings(source, settings)
    examples = task.examples(s["split"])[: s["limit"]]
    if not examples:
        raise ValueError(f"split {s['split']!r} of task {task.name!r} has no prompts")
    prompts = [task.prompt(e) for e in examples]
    meta = {
        "format": td.FORMAT,
        "version": td.FORMAT_VERSION,
        "policy": policy_name,
        "tokenizer": {"sha256": td.tokenizer_fingerprint(tokenizer), "eos_token_id": tokenizer.eos_token_id},
        "task": {"name": task.name, "config": td.task_config(task)},
        "split": s["split"],
        "num_prompts": len(examples),
        "prompts_sha256": td.prompts_fingerprint(prompts),
        "sampling": {"temperature": float(s["temperature"]), "top_p": 1.0, "max_new_tokens": max_new_tokens,
                     "seed": s["seed"], "batch_size": s["batch_size"]},
        "chunk_size": s["chunk_size"],
        "splitter": td.splitter_config(splitter),
        "targets": {"source": source, **{k: v for k, v in s.items() if k not in _COMMON or k.startswith("max_")}},
    }
    output = Path(output)
    done = td.prepare_output(output, meta)
    size = s["chunk_size"]
    chunks = [(a, min(a + size, len(examples)) - 1) for a in range(0, len(examples), size)]
    todo = [c for c in chunks if c not in done]
    if not todo:
        return output
    prompt_ids = encode_prompts(tokenizer, prompts)
    if source == "mcts":
        build = _MCTSChunks(policy, tokenizer, task, splitter, s, max_new_tokens)
    else:
        build = _SampledChunks(policy, tokenizer, task, splitter, source, s, max_new_tokens, output, examples,
                               policy_name, progress)
    bar = tqdm(todo, desc=f"dvo targets ({source})", unit="chunk", total=len(chunks),
               initial=len(chunks) - len(todo), disable=not progress, dynamic_ncols=True)
    for first, last in bar:
        rows = build(output, first, last, examples[first : last + 1], prompt_ids[first : last + 1])
        td.write_shard(output, first, last, rows)
    return output


class _MCTSChunks:
    """Searches one chunk of prompts and extracts its rows (resuming from its trees file)."""

    def __init__(self, policy, tokenizer, task, splitter, s: dict, max_new_tokens: int) -> None:
        from lit_reason.rollout.sampler import RolloutEngine

        self.task, self.splitter, self.s, self.tokenizer = task, splitter, s, tokenizer
        self.engine = RolloutEngine(policy, tokenizer, max_new_tokens=max_new_tokens, temperature=s["temperature"],
                                    batch_size=s["batch_size"], seed=s["seed"])

    def __call__(self, output: Path, first: int, last: int, examples, prompt_ids) -> list[dict]:
        from lit_reason.data.trajectories import chunk_seed
        from lit_reason.rollout.mcts import LMStepProposer, StepMCTS, load_trees, save_trees
        from lit_reason.rollout.mcts_paths import extract_rows

        s = self.s
        seed = chunk_seed(s["seed"], first)
        self.engine.reseed(seed)
        proposer = LMStepProposer(self.engine, self.splitter, self.task, temperature=s["temperature"])
        mcts = StepMCTS(proposer, simulations=s["simulations"], width=s["width"], c_puct=s["c_puct"],
                        max_depth=s["max_depth"], leaves_per_tree=s["leaves_per_tree"], seed=seed)
        file = output / _trees_name(first, last)
        trees = load_trees(file) if file.exists() else mcts.new_trees(prompt_ids, range(first, last + 1))
        mcts.search(trees, examples)  # a tree loaded with its budget spent costs nothing
        rows, stats = extract_rows(trees, s["max_correct"], s["max_incorrect"], seed=s["seed"], split=s["split"],
                                   eos_token_id=self.tokenizer.eos_token_id)
        save_trees(file, trees, meta={"search": mcts.stats.as_dict(), "extraction": vars(stats)})
        return rows


class _SampledChunks:
    """Collected responses + V(S_k) from an outcome value model or MC rollouts, chunk by chunk."""

    def __init__(self, policy, tokenizer, task, splitter, source: str, s: dict, max_new_tokens: int, output: Path,
                 examples, policy_name: str, progress: bool) -> None:
        from lit_reason.data.collect import collect
        from lit_reason.data.trajectories import TrajectoryDataset

        self.policy, self.tokenizer, self.task, self.s = policy, tokenizer, task, s
        self.max_new_tokens = max_new_tokens
        self.examples = examples
        samples = collect((policy, tokenizer), task, output / "samples", samples=s["samples"], split=s["split"],
                          limit=len(examples), temperature=s["temperature"], max_new_tokens=max_new_tokens,
                          seed=s["seed"], chunk_size=s["chunk_size"], splitter=splitter, progress=progress,
                          batch_size=s["batch_size"], policy_name=policy_name)
        self.rows = TrajectoryDataset(samples).rows
        self.value_model = None
        if source == "value_model":
            vm_dir = output / "value_model"
            if (vm_dir / "value_head.json").exists():
                from lit_reason.models.value import ValueModel

                self.value_model = ValueModel.load(vm_dir).to(next(policy.parameters()).device)
            else:
                self.value_model = train_outcome_value_model(policy, self.rows, pad_token_id=tokenizer.pad_token_id,
                                                             epochs=s["value_epochs"], lr=s["value_lr"],
                                                             batch_size=s["value_batch_size"], seed=s["seed"])
                self.value_model.save(vm_dir)

    def __call__(self, output: Path, first: int, last: int, examples, prompt_ids) -> list[dict]:
        from lit_reason.data.trajectories import chunk_seed

        chosen = select_sampled_rows([r for r in self.rows if first <= r["prompt_index"] <= last],
                                     self.s["max_correct"], self.s["max_incorrect"], self.s["seed"])
        if not chosen:
            return []
        prompts, partials, owners = [], [], []
        for b, r in enumerate(chosen):
            for k in range(len(r["step_ends"])):
                prompts.append(r["prompt_ids"])
                partials.append(r["response_ids"][: r["step_ends"][k - 1] + 1] if k else [])
                owners.append((b, k))
        if self.value_model is not None:
            values = outcome_values(self.value_model, chosen, self.tokenizer.pad_token_id, self.s["value_batch_size"])
        else:
            from lit_reason.rollout.monte_carlo import mc_values
            from lit_reason.rollout.sampler import RolloutEngine

            engine = RolloutEngine(self.policy, self.tokenizer, max_new_tokens=self.max_new_tokens,
                                   temperature=self.s["temperature"], batch_size=self.s["batch_size"],
                                   seed=chunk_seed(self.s["seed"], first))
            flat = mc_values(engine, self.task, prompts, partials,
                             [self.examples[chosen[b]["prompt_index"]] for b, _ in owners], self.s["mc_rollouts"])
            values = torch.zeros(len(chosen), max(len(r["step_ends"]) for r in chosen))
            for (b, k), v in zip(owners, flat.tolist()):
                values[b, k] = 2.0 * v - 1.0  # [0, 1] success rate -> the +-1 reward scale
        num = torch.tensor([len(r["step_ends"]) for r in chosen])
        rewards = torch.tensor([2.0 * float(r["reward"]) - 1.0 for r in chosen])
        targets = targets_from_values(values, rewards, num)
        return [dict(r, step_targets=targets[b, : num[b]].tolist(), step_values=values[b, : num[b]].tolist())
                for b, r in enumerate(chosen)]


def select_sampled_rows(rows: Sequence[dict], max_correct: int, max_incorrect: int, seed: int) -> list[dict]:
    """The collected responses DVO trains on, selected like the search's paths (module doc).

    Returns rows ordered by prompt, correct before incorrect, each list drawn uniformly without
    replacement by a generator seeded with ``(seed, prompt_index)``.
    """
    from lit_reason.data.selection import group_by_prompt

    out = []
    for _key, group in group_by_prompt(rows).items():
        seen: dict[tuple, dict] = {}
        for r in group:
            if r["finish"] != "length":
                seen.setdefault(tuple(r["response_ids"]), r)
        kept = list(seen.values())
        correct = [r for r in kept if r["reward"] > 0]
        if not correct:
            continue  # as in the search's extraction: no correct response, no data
        rng = random.Random(seed * 1_000_003 + int(group[0]["prompt_index"]))
        wrong = [r for r in kept if r["reward"] <= 0]
        out += rng.sample(correct, min(max_correct, len(correct))) + rng.sample(wrong, min(max_incorrect, len(wrong)))
    return out


def _state_positions(rows: Sequence[dict], P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the last token of each state S_k in a ``to_batch`` layout: ``([B, S], valid)``.

    S_0 ends at the prompt's last token (P - 1), S_k (k >= 1) at the last token of step k - 1.
    """
    S = max(len(r["step_ends"]) for r in rows)
    pos = torch.zeros(len(rows), S, dtype=torch.long)
    valid = torch.zeros(len(rows), S, dtype=torch.bool)
    for b, r in enumerate(rows):
        T = len(r["step_ends"])
        pos[b, :T] = torch.tensor([P - 1] + [P + e for e in r["step_ends"][:-1]])
        valid[b, :T] = True
    return pos, valid


def train_outcome_value_model(policy, rows: Sequence[dict], pad_token_id: int, epochs: int = 2, lr: float = 1e-4,
                              batch_size: int = 32, seed: int = 0):
    """An outcome value model: V(S_k) regressed by MSE onto 2R - 1 for every step state of ``rows``.

    docs/dvo.md: a separate V network trained by MSE to
    predict the final outcome. Its trunk is a copy of the policy's (LoRA merged), the head a
    zero-initialised linear layer with a bias, trained with AdamW; the loss is the mean over all
    step-boundary states S_0 .. S_{T-1} of the batch. Truncated responses count as wrong (R = 0).

    Returns:
        The trained :class:`~lit_reason.models.value.ValueModel` (eval mode, on the policy's device).
    """
    from lit_reason.data.trajectories import TrajectoryDataset
    from lit_reason.models.policy import is_lora
    from lit_reason.models.value import ValueModel, lm_trunk

    lm = copy.deepcopy(policy)
    if is_lora(lm):
        lm = lm.merge_and_unload()
    model = ValueModel(lm_trunk(lm), lm.config.hidden_size, bias=True, zero_init=True)
    model.requires_grad_(True)
    model.train()
    device = next(policy.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    rows = [r for r in rows if r["step_ends"]]
    gen = random.Random(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            order = list(range(len(rows)))
            gen.shuffle(order)
            for start in range(0, len(order), batch_size):
                chunk = [rows[i] for i in order[start : start + batch_size]]
                b = TrajectoryDataset.to_batch(chunk, pad_token_id).to(device)
                pos, valid = _state_positions(chunk, b.prompt_len)
                values = model(b.input_ids, b.attention_mask).gather(1, pos.to(device))  # [B, S]
                target = (2.0 * b.rewards - 1.0).unsqueeze(1).expand_as(values)
                loss = ((values - target) ** 2)[valid.to(device)].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model.eval()


@torch.no_grad()
def outcome_values(model, rows: Sequence[dict], pad_token_id: int, batch_size: int = 64) -> torch.Tensor:
    """``[B, S]`` V(S_k) of each row's step states from an outcome value model (0 past T)."""
    from lit_reason.data.trajectories import TrajectoryDataset

    device = model.head.weight.device
    S = max(len(r["step_ends"]) for r in rows)
    out = torch.zeros(len(rows), S)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        b = TrajectoryDataset.to_batch(chunk, pad_token_id).to(device)
        pos, valid = _state_positions(chunk, b.prompt_len)
        v = model(b.input_ids, b.attention_mask).gather(1, pos.to(device)).float().cpu()
        out[start : start + len(chunk), : v.shape[1]] = torch.where(valid, v, torch.zeros_like(v))
    return out


def target_dataset_stats(path: str | Path) -> dict[str, float]:
    """Search and extraction totals of an MCTS target dataset (summed over its trees files)."""
    totals: dict[str, float] = {}
    for file in sorted(Path(path).glob("trees-*.json")):
        with open(file, encoding="utf-8") as f:
            meta = json.load(f).get("meta", {})
        for group in ("search", "extraction"):
            for k, v in meta.get(group, {}).items():
                totals[f"{group}/{k}"] = totals.get(f"{group}/{k}", 0.0) + float(v)
    wall = totals.get("search/wall_time", 0.0)
    if wall > 0:
        totals["search/simulations_per_s"] = totals["search/simulations"] / wall
        totals["search/tokens_per_s"] = totals["search/generated_tokens"] / wall
    return totals


# ---------------------------------------------------------------------------------------------
# the LightningModule
# ---------------------------------------------------------------------------------------------
