"""DVO: Direct Value Optimization (METHODS section 4, Decision 6).

The policy's summed step log-ratio, scaled by beta, is regressed onto externally estimated value
differences (:func:`lit_reason.losses.dvo.dvo_loss`)::

    L_k      = sum_{tokens t in step k} log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t)
    target_k = V(S_{k+1}) - V(S_k)                          (V(S_T) = R, the +-1 outcome)
    L_DVO    = mean_b [ (1/T_b) sum_k (beta * L_k - target_k)^2 ]

Target sources (one switch, ``target_source``)
----------------------------------------------
``mcts`` (the paper's main variant)
    Step-level MCTS with the start policy on the training prompts
    (:mod:`lit_reason.rollout.mcts`: PUCT c = 1.5, width 5, depth 8, 80 simulations, +-1 terminal
    rewards backed up); up to 8 correct and 8 incorrect root-to-leaf paths per prompt,
    ``target_k = Q(node_{k+1}) - Q(node_k)`` (:mod:`lit_reason.rollout.mcts_paths`).
``value_model`` (the paper's "outcome value model" alternative)
    ``samples`` responses per prompt are collected (:func:`lit_reason.commands.collect.collect`);
    a :class:`~lit_reason.models.value.ValueModel` on a copy of the policy's trunk is trained by
    MSE on the outcomes (every step-boundary state S_k of a response regressed onto its 2R - 1) and
    supplies V(S_k); ``targets_from_values``.
``mc``
    The same collected responses; V(S_k) = 2 * (mean outcome of ``mc_rollouts`` fresh
    continuations) - 1 (:func:`lit_reason.rollout.monte_carlo.mc_values`); ``targets_from_values``.

All three give targets on the same +-1 reward scale, so one beta serves them all. For the two
non-search sources the responses are selected as the search's paths are: truncated responses
are dropped (MCTS prunes those leaves), identical responses of a prompt are kept once (tree paths
are distinct), prompts without a correct response are dropped, and at most ``max_correct`` correct
and ``max_incorrect`` incorrect responses per prompt are drawn (uniformly; the search draws
proportionally to visits).

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

Rounds: :meth:`DVO.refresh_targets` rebuilds the targets with the *current* policy (a new search);
:class:`lit_reason.callbacks.mcts_refresh.MCTSTargetRefresh` calls it every N epochs and
:class:`lit_reason.callbacks.rounds.IterativeRounds` at its round boundaries (through
:meth:`DVO.recollect`). The reference stays the start policy in every round (METHODS lists "whether
pi_ref is updated per round" as open; a fixed reference keeps resume exact, since the reference is
never checkpointed).
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from lit_reason.losses.dvo import dvo_loss, step_logratios, targets_from_values
from lit_reason.methods.offline import OfflineRL
from lit_reason.models.logprobs import response_logprobs
from lit_reason.rollout.mcts_paths import step_targets_tensor

__all__ = ["DVO", "TARGET_SOURCES", "build_target_dataset", "check_target_settings", "target_dataset_stats",
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
    """The full settings of a target source: ``settings`` over the defaults (METHODS section 4).

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
        from lit_reason.commands.collect import collect
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

    METHODS section 4 ("Models", the alternative variant): a separate V network trained by MSE to
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
class DVO(OfflineRL):
    """DVO (METHODS section 4). Other arguments: :class:`~lit_reason.methods.offline.OfflineRL`
    (its ``collect`` is replaced by ``targets``).

    Args:
        beta: KL coefficient beta of the implicit value (0.1).
        target_source: ``mcts`` (default), ``value_model`` or ``mc`` (module doc).
        targets: Settings of building the target dataset into ``data`` on first use
            (:func:`check_target_settings`); None: ``data`` must hold a complete target dataset.

    ``state_values`` (value calibration) is the implicit value ``beta * sum_t log pi/pi_ref`` of
    the partial response: the estimate of V(S_k) - V(S_0) on the +-1 reward scale that the
    training regresses (its steps telescope). ``value_range = (-1, 1)`` maps it onto [0, 1] with
    V(S_0) taken as 0 (success probability 1/2), so ``value/rank_acc`` is the scale-free measure
    and the MAE/ECE read the increment only.
    """

    value_range = (-1.0, 1.0)

    def __init__(self, beta: float = 0.1, target_source: str = "mcts", targets: dict | None = None,
                 **kwargs) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if kwargs.get("collect") is not None:
            raise ValueError("DVO builds its data with `targets` (settings of target_source "
                             f"{target_source!r}), not `collect`")
        check_target_settings(target_source, targets)
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["task"])
        self.refresh_simulations: int | None = None  # set by MCTSTargetRefresh when it defers to rounds

    # ---- data -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if self.data_path is None:
            self.data_path = Path(self.trainer.default_root_dir) / "data"
        if self.hparams.targets is not None:
            # rank 0 builds (or resumes / reuses) with the start policy; the others wait and read it
            if self.trainer.is_global_zero:
                self.build_targets(self.data_path, self.hparams.targets, policy_name=self.hparams.policy)
            self.trainer.strategy.barrier("lit_reason_dvo_targets")

    def build_targets(self, output: str | Path, settings: dict, policy_name: str) -> Path:
        """Builds the target dataset with the module's *current* policy (:func:`build_target_dataset`)."""
        started = time.perf_counter()
        path = build_target_dataset(self.policy, self.tokenizer, self.task, self.splitter, output,
                                    self.hparams.target_source, settings, max_new_tokens=self.hparams.max_new_tokens,
                                    policy_name=policy_name, progress=self.hparams.progress)
        self.data_stats["data/build_seconds"] = time.perf_counter() - started
        return path

    def refresh_targets(self, output: str | Path, seed: int, tag: str, simulations: int | None = None) -> Path:
        """Rebuilds the targets with the current policy into ``output``; trains on them next.

        The settings are ``targets``' (else those in the current dataset's meta) with ``seed``
        replaced and, for the mcts source, ``simulations`` when given (or set by
        :class:`~lit_reason.callbacks.mcts_refresh.MCTSTargetRefresh`). The policy is recorded as
        ``<policy>@<tag>``. Runs on global rank 0 (callers broadcast the folder).
        """
        settings = dict(self.hparams.targets) if self.hparams.targets is not None else self._settings_from_meta()
        settings["seed"] = seed
        simulations = simulations if simulations is not None else self.refresh_simulations
        if simulations is not None:
            if self.hparams.target_source != "mcts":
                raise ValueError(f"simulations applies to target_source 'mcts', not {self.hparams.target_source!r}")
            settings["simulations"] = simulations
        path = self.build_targets(Path(output), settings, policy_name=f"{self.hparams.policy}@{tag}")
        self.use_dataset(path)
        return path

    def recollect(self, output: str | Path, seed: int, round_index: int) -> Path:
        """IterativeRounds' protocol: a round of DVO re-runs the target source (the search) with the current policy."""
        return self.refresh_targets(output, seed=seed, tag=f"round{round_index}")

    def _settings_from_meta(self) -> dict:
        from lit_reason.data.trajectories import read_meta

        meta = read_meta(self._require_data())
        stored = dict(meta.get("targets") or {})
        if stored.pop("source", None) != self.hparams.target_source:
            raise ValueError(f"dataset {self.data_path} was not built for target_source "
                             f"{self.hparams.target_source!r}: set `targets` to rebuild it")
        return {**stored, "split": meta["split"], "limit": meta["num_prompts"], "chunk_size": meta["chunk_size"],
                "temperature": meta["sampling"]["temperature"], "batch_size": meta["sampling"]["batch_size"]}

    def load_rows(self) -> list[dict]:
        rows = super().load_rows()
        if self.hparams.target_source == "mcts":
            self.data_stats.update({f"data/{k}": v for k, v in target_dataset_stats(self.data_path).items()
                                    if k.startswith("extraction/")})
        return rows

    def select_items(self, rows: list[dict]) -> list[dict]:
        for r in rows:
            targets = r.get("step_targets")
            if targets is None or len(targets) != len(r["step_ends"]):
                raise ValueError(f"DVO: dataset {self.data_path} row (prompt {r['prompt_index']}, sample "
                                 f"{r['sample_index']}) has no step_targets for its {len(r['step_ends'])} steps: "
                                 "it is not a DVO target dataset (build one with `targets`)")
        if rows:
            n = sum(len(r["step_targets"]) for r in rows)
            self.data_stats["data/target_abs_mean"] = sum(abs(t) for r in rows for t in r["step_targets"]) / n
        return list(rows)

    # ---- loss -------------------------------------------------------------------------------
    def training_step(self, rows: list[dict], batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            self.log_data_stats()
        b = self.to_batch(rows)
        S = b.step_ends.shape[1]
        targets = step_targets_tensor(rows, S).to(self.device)  # [B, S], +-1 reward scale
        logp = response_logprobs(self.policy, b.input_ids, b.attention_mask, b.prompt_len)  # [B, L]
        ref = self.reference.logprobs(b.input_ids, b.attention_mask, b.prompt_len)  # [B, L]
        ratios = step_logratios(logp, ref, b.step_ids, b.num_steps, S)  # [B, S], summed over each step
        loss, metrics = dvo_loss(ratios, targets, b.num_steps, beta=self.hparams.beta)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=len(rows))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(rows))
        return loss

    # ---- values -----------------------------------------------------------------------------
    def state_values(self, prompt_ids, partial_ids, examples) -> torch.Tensor:
        """Value-calibration protocol: ``beta * sum_t log pi/pi_ref`` of each partial response, [N]."""
        return self.implicit_state_values(prompt_ids, partial_ids, self.hparams.beta)
