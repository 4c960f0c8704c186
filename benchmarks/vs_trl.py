"""Side by side with TRL: the same GRPO and DPO work in lit_reason and in TRL, timed and scored.

Runs ``recipes/grpo.yaml`` against TRL's ``GRPOTrainer`` and ``recipes/dpo.yaml`` against TRL's
``DPOTrainer`` on the same start policy (``embedded:arithmetic``, a ``save_pretrained`` folder),
the same training prompts, reward (``task.reward``; a response cut at the length limit earns 0
on both sides), group size, batch, lengths, learning rate, KL coefficient and number of
optimiser steps. DPO trains on the same preference pairs, chosen by lit_reason's own
``DPO.select_items`` from the dataset the DPO recipe uses, fed to TRL as the same token ids.

Every run is its own subprocess (so peak RSS is per run); runs alternate (ours, TRL, ours, TRL)
so machine noise hits both. Held-out greedy accuracy is measured for both with
:func:`lit_reason.evaluation.evaluate_policy` on the first ``--eval-limit`` validation prompts.
TRL is not a dependency of lit_reason: ``pip install "trl==1.16.*"`` (or ``pip install -e
".[trl]"``). The settings made equal, and those that cannot be, are listed in README ("Side by
side with TRL").

A real model: ``--recipes recipes/smollm2`` runs that folder's recipes instead (SmolLM2-135M-Instruct,
chat prompts, LoRA on both sides, TRL given the recipe's LoRA as a ``peft`` config and its gradient
checkpointing); a method without a recipe there is refused.

    python benchmarks/vs_trl.py                       # GRPO and DPO, seeds 0 and 1, the recipes' lengths
    python benchmarks/vs_trl.py --methods grpo --seeds 0 --steps 8 --eval-limit 16
    python benchmarks/vs_trl.py --recipes recipes/smollm2 --methods grpo --steps 4 --eval-limit 48
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_HINT = 'TRL is not installed: pip install "trl==1.16.*" (or pip install -e ".[trl]")'
DPO_DATA = "runs/data/arithmetic-t0.7-k8"  # the shared dataset of recipes/dpo.yaml


# ---- the work, shared by both sides -------------------------------------------------------------
# the recipe settings that both sides read and that --grpo/--dpo may change (on both sides at once)
SHARED_SETTINGS = {"grpo": ("prompts_per_iteration", "samples_per_prompt", "minibatch_size", "epochs_per_iteration",
                            "lr", "temperature", "kl_coef"),
                   "dpo": ("batch_size", "lr", "beta")}


def recipe_file(method: str, recipes: str = "recipes") -> Path:
    """``<recipes>/<method>.yaml`` under the repository (``recipes``: a folder relative to it)."""
    return REPO / recipes / f"{method}.yaml"


def recipe_init_args(method: str, overrides: dict | None = None, recipes: str = "recipes") -> dict:
    """The recipe's ``model.init_args`` with ``overrides`` (keys of ``SHARED_SETTINGS``) applied."""
    import yaml

    recipe = yaml.safe_load(recipe_file(method, recipes).read_text())
    return {**recipe["model"]["init_args"], **(overrides or {})}


def parse_overrides(method: str, items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> a dict (values read as YAML); unknown keys fail naming the allowed ones."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in SHARED_SETTINGS[method]:
            raise SystemExit(f"--{method} {item!r}: expected KEY=VALUE with KEY one of {SHARED_SETTINGS[method]}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key] = parsed
    return out


def recipe_max_steps(method: str, recipes: str = "recipes") -> int:
    import yaml

    return int(yaml.safe_load(recipe_file(method, recipes).read_text())["trainer"]["max_steps"])


def policy_folder(hp: dict) -> Path:
    """The recipe's start policy as a ``save_pretrained`` folder TRL can load: ``embedded:arithmetic``
    and GGUF models (``smollm2:135m-instruct``) as their cached folders, built on first use."""
    from lit_reason.models.embedded import ensure_embedded
    from lit_reason.models.gguf import is_gguf_name, resolve_gguf_name

    name = str(hp.get("policy", "embedded:arithmetic"))
    if name.startswith("embedded:"):
        return Path(ensure_embedded(name.removeprefix("embedded:")))
    return Path(resolve_gguf_name(name)) if is_gguf_name(name) else Path(name)


def load_start_policy(hp: dict):
    """(model, tokenizer) of the recipe's start policy from its folder, in fp32 as lit_reason loads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(policy_folder(hp))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def recipe_task(hp: dict, tokenizer):
    """The recipe's task, its prompts rendered with ``tokenizer`` (chat prompts need its template)."""
    from lit_reason.methods.common import resolve_task

    task = resolve_task(hp.get("task", "arithmetic"))
    task.use_tokenizer(tokenizer)
    return task


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def held_out_accuracy(model, tokenizer, limit: int, hp: dict) -> float:
    """Greedy accuracy on the first ``limit`` validation prompts of the recipe's task, at its length limit."""
    from lit_reason.evaluation import evaluate_policy

    task = recipe_task(hp, tokenizer)
    model.eval()
    result = evaluate_policy(model, tokenizer, task, task.examples("validation")[:limit],
                             max_new_tokens=hp.get("max_new_tokens", 96), batch_size=hp.get("rollout_batch_size", 128))
    return float(result["accuracy"])


class LoopClock:
    """Wall-clock of the training loop alone: from the framework's train-start hook (after its data
    and optimiser setup) to its train-end hook, so one-time dataset preparation is outside it on
    both sides. Used as a Lightning callback and as a transformers ``TrainerCallback``."""

    started = ended = None

    def on_train_start(self, *_):  # Lightning
        self.started = time.perf_counter()

    def on_train_end(self, *_, **__):  # both
        self.ended = time.perf_counter()

    def on_train_begin(self, *_, **__):  # transformers
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class Timer:
    """Wraps a callable, summing its wall-clock (and, via ``count``, a number read off its result)."""

    def __init__(self, fn, count=None):
        self.fn, self.count, self.seconds, self.calls, self.total = fn, count, 0.0, 0, 0

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        if self.count is not None:
            self.total += int(self.count(out))
        return out


# ---- lit_reason -----------------------------------------------------------------------------------
def ours_cli(method: str, seed: int, steps: int | None, rundir: Path, extra: list[str], recipes: str = "recipes"):
    """The recipe through LightningCLI (run=False), without its evaluation/calibration callbacks
    and loggers: the timed loop is the training alone on both sides."""
    import lightning.pytorch as pl
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    args = ["--config", str(recipe_file(method, recipes)), "--seed_everything", str(seed),
            "--model.init_args.seed", str(seed), "--model.init_args.progress", "false",
            "--trainer.default_root_dir", str(rundir), "--trainer.logger", "false", "--trainer.callbacks", "[]",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.limit_val_batches", "0", *(["--trainer.max_steps", str(steps)] if steps else []), *extra]
    return LightningCLI(pl.LightningModule, subclass_mode_model=True, parser_kwargs={"parser_mode": "omegaconf+"},
                        save_config_kwargs={"overwrite": True}, args=args, run=False)


def run_ours(spec: dict) -> dict:
    import lit_reason.methods.online as online

    method, rundir = spec["method"], Path(spec["rundir"])
    extra = [a for k, v in spec.get("overrides", {}).items() for a in (f"--model.init_args.{k}", str(v))]
    if method == "dpo":
        # the recipe trains one epoch; more steps than an epoch's batches continue into the next, as TRL does
        epochs = -(-spec["steps"] // spec["batches"])
        extra += ["--model.init_args.data", spec["data"], "--model.init_args.collect", "null",
                 "--model.init_args.dpo_positive_lambda", str(spec["dpo_positive_lambda"]),
                 "--trainer.max_epochs", str(epochs)]
    # instrument the online loop's rollout (sampling + grading) and its whole collect phase
    sampling = Timer(online.rollout, count=lambda traj: traj.response_mask.sum())
    online.rollout = sampling
    cli = ours_cli(method, spec["seed"], spec["steps"], rundir, extra, spec["recipes"])
    model, trainer = cli.model, cli.trainer
    import lightning.pytorch as pl

    clock = type("LightningLoopClock", (LoopClock, pl.Callback), {})()
    trainer.callbacks.append(clock)
    collect = None
    if hasattr(model, "collect"):
        collect = Timer(model.collect)
        model.collect = collect
    started = time.perf_counter()
    trainer.fit(model)
    train_seconds = time.perf_counter() - started
    out = {"steps": int(trainer.global_step), "train_seconds": train_seconds, "loop_seconds": clock.seconds,
           "peak_rss_mb": peak_rss_mb()}
    if collect is not None:
        out.update(generation_seconds=sampling.seconds, rollout_seconds=collect.seconds,
                   generated_tokens=sampling.total)
    out["end_accuracy"] = held_out_accuracy(model.policy, model.tokenizer, spec["eval_limit"],
                                            recipe_init_args(method, None, spec["recipes"]))
    return out


# ---- TRL ------------------------------------------------------------------------------------------
def trl_common(spec: dict, hp: dict) -> dict:
    """TrainingArguments shared by both TRL trainers, set to lit_reason's values (``hp``: the recipe's)."""
    return dict(output_dir=str(spec["rundir"]), seed=spec["seed"], data_seed=spec["seed"], use_cpu=True,
                bf16=False, fp16=False, gradient_checkpointing=bool(hp.get("gradient_checkpointing", False)),
                # lit_reason checkpoints non-reentrantly (LoRA behind frozen embeddings needs it)
                gradient_checkpointing_kwargs={"use_reentrant": False}, report_to="none", save_strategy="no",
                logging_steps=10, disable_tqdm=True, dataloader_num_workers=0, gradient_accumulation_steps=1,
                adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0)


def trl_clock(trainer) -> LoopClock:
    from transformers import TrainerCallback

    clock = type("TrainerLoopClock", (LoopClock, TrainerCallback), {})()
    trainer.add_callback(clock)
    return clock


def peft_config(hp: dict):
    """The recipe's LoRA as a ``peft.LoraConfig`` (None without LoRA)."""
    if not hp.get("lora"):
        return None
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **hp["lora"])


def run_trl_grpo(spec: dict) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    hp = recipe_init_args("grpo", spec.get("overrides"), spec["recipes"])
    model, tokenizer = load_start_policy(hp)
    task = recipe_task(hp, tokenizer)
    eos = tokenizer.eos_token_id
    rows = task.examples("train")
    dataset = Dataset.from_list([{"prompt": task.prompt(r), "row": json.dumps(r)} for r in rows])

    def task_reward(prompts, completions, completion_ids, row, **_):
        # lit_reason's grading: a response cut at the length limit (no EOS) earns 0
        return [float(task.reward(text, json.loads(r))) if ids and ids[-1] == eos else 0.0
                for text, ids, r in zip(completions, completion_ids, row)]

    G = hp["samples_per_prompt"]
    config = GRPOConfig(
        **trl_common(spec, hp),
        max_steps=spec["steps"], learning_rate=hp["lr"], lr_scheduler_type="constant", warmup_steps=0,
        num_generations=G, generation_batch_size=hp["prompts_per_iteration"] * G,
        per_device_train_batch_size=hp["minibatch_size"], num_iterations=hp["epochs_per_iteration"],
        max_completion_length=hp.get("max_new_tokens", 96), temperature=hp["temperature"], top_p=1.0, top_k=0,
        beta=hp["kl_coef"], epsilon=0.2, loss_type="bnpo", scale_rewards="group",
        use_bias_correction_kl=False, mask_truncated_completions=False, disable_dropout=True,
        log_completions=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=task_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config(hp))
    clock = trl_clock(trainer)
    sampling = Timer(trainer._generate, count=lambda out: sum(len(ids) for ids in out[1]))
    trainer._generate = sampling
    rollout_phase = Timer(trainer._generate_and_score_completions)
    trainer._generate_and_score_completions = rollout_phase
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    out = {"steps": int(trainer.state.global_step), "train_seconds": train_seconds, "loop_seconds": clock.seconds,
           "peak_rss_mb": peak_rss_mb(), "generation_seconds": sampling.seconds, "rollout_seconds": rollout_phase.seconds,
           "generated_tokens": sampling.total}
    out["end_accuracy"] = held_out_accuracy(trainer.model, tokenizer, spec["eval_limit"], hp)
    return out


def run_trl_dpo(spec: dict) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        # the pairs arrive as lit_reason's token ids: TRL re-tokenising decoded text could merge
        # tokens across the prompt/response boundary and would append EOS to cut responses
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    hp = recipe_init_args("dpo", spec.get("overrides"), spec["recipes"])
    pairs = json.loads(Path(spec["pairs"]).read_text())
    model, tokenizer = load_start_policy(hp)
    steps = spec["steps"]
    config = DPOConfig(
        **trl_common(spec, hp),
        max_steps=steps, learning_rate=hp["lr"], per_device_train_batch_size=hp["batch_size"],
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=int(0.03 * steps), beta=hp["beta"], loss_type=["sigmoid"], max_length=None,
        precompute_ref_log_probs=False, disable_dropout=True,
    )
    trainer = PretokenizedDPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs),
                                     processing_class=tokenizer, peft_config=peft_config(hp))
    clock = trl_clock(trainer)
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    out = {"steps": int(trainer.state.global_step), "train_seconds": train_seconds, "loop_seconds": clock.seconds,
           "peak_rss_mb": peak_rss_mb()}
    out["end_accuracy"] = held_out_accuracy(trainer.model, tokenizer, spec["eval_limit"], hp)
    return out


# ---- preparation: DPO pairs and the start accuracy ------------------------------------------------
def prepare_dpo_pairs(spec: dict) -> dict:
    """Collects the DPO recipe's dataset if missing (its own ``collect`` settings) and writes
    lit_reason's pairs (``DPO.select_items``) as token ids for TRL."""
    collect = spec["collect"] or "null"
    cli = ours_cli("dpo", spec["seed"], None, Path(spec["rundir"]),
                   ["--model.init_args.data", spec["data"], "--model.init_args.collect", collect], spec["recipes"])
    module = cli.model
    if module.builds_data():
        module.build_dataset(Path(spec["data"]))
    pairs = module.select_items(module.load_rows())
    rows = [{"prompt_ids": list(w["prompt_ids"]), "chosen_ids": list(w["response_ids"]),
             "rejected_ids": list(lose["response_ids"])} for w, lose in pairs]
    Path(spec["pairs"]).write_text(json.dumps(rows))
    batch_size = recipe_init_args("dpo", spec.get("overrides"), spec["recipes"])["batch_size"]
    # the start policy's accuracy here too: one interpreter fewer
    return {"pairs": len(rows), "batches": -(-len(rows) // batch_size), **start_accuracy(spec)}


def start_accuracy(spec: dict) -> dict:
    """Held-out greedy accuracy of the start policy of ``spec["method"]``'s recipe."""
    hp = recipe_init_args(spec["method"], None, spec["recipes"])
    model, tokenizer = load_start_policy(hp)
    return {"accuracy": held_out_accuracy(model, tokenizer, spec["eval_limit"], hp)}


CHILD = {"ours": run_ours, "trl_grpo": run_trl_grpo, "trl_dpo": run_trl_dpo, "pairs": prepare_dpo_pairs,
         "start": start_accuracy}


def die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the parent dies, so a killed benchmark leaves no run behind."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child(spec: dict) -> dict:
    die_with_parent()
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    key = spec["kind"] if spec["kind"] != "trl" else f"trl_{spec['method']}"
    return CHILD[key](spec)


def spawn(spec: dict, timeout: float) -> dict:
    """Runs one piece of work in a fresh interpreter; returns the dict it printed last."""
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['kind']} {spec.get('method', '')} seed {spec.get('seed')} failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the table ------------------------------------------------------------------------------------
def per_step(r: dict, key: str) -> float | None:
    if key == "train_seconds" and "loop_seconds" in r:
        key = "loop_seconds"  # the training loop alone (older results: the whole fit call)
    return r[key] / r["steps"] if key in r and r["steps"] else None


def fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def accuracies(runs: list[dict]) -> str:
    return ", ".join(format(r["end_accuracy"], ".3f") for r in runs)


def table(results: list[dict], start: float) -> str:
    lines = ["| method | framework | seed | steps | s / step | generation s / step | scoring s / step | "
             "update s / step | generated tok/s | peak RSS MB | accuracy start -> end |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        gen, roll = per_step(r, "generation_seconds"), per_step(r, "rollout_seconds")
        total = per_step(r, "train_seconds")
        score = None if roll is None else roll - gen
        update = None if roll is None else total - roll
        tps = r["generated_tokens"] / r["generation_seconds"] if r.get("generation_seconds") else None
        lines.append(f"| {r['method']} | {r['framework']} | {r['seed']} | {r['steps']} | {total:.3f} | "
                     f"{fmt(gen, '.3f')} | {fmt(score, '.3f')} | {fmt(update, '.3f')} | {fmt(tps, ',.0f')} | "
                     f"{r['peak_rss_mb']:,.0f} | {start:.3f} -> {r['end_accuracy']:.3f} |")
    lines += ["", "| method | ours / TRL: s per step (mean of seeds) | peak RSS | accuracy end, ours | "
              "accuracy end, TRL |", "| --- | --- | --- | --- | --- |"]
    for method in dict.fromkeys(r["method"] for r in results):
        ours = [r for r in results if r["method"] == method and r["framework"] == "lit_reason"]
        trl = [r for r in results if r["method"] == method and r["framework"] == "trl"]
        if not ours or not trl:
            continue
        mean = lambda rs, k: sum(per_step(r, k) if k == "train_seconds" else r[k] for r in rs) / len(rs)  # noqa: E731
        lines.append(f"| {method} | {mean(ours, 'train_seconds') / mean(trl, 'train_seconds'):.2f} | "
                     f"{mean(ours, 'peak_rss_mb') / mean(trl, 'peak_rss_mb'):.2f} | "
                     f"{accuracies(ours)} | {accuracies(trl)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["grpo", "dpo"], choices=["grpo", "dpo"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps per run (default: GRPO 160 as its recipe, DPO one epoch of its pairs)")
    p.add_argument("--eval-limit", type=int, default=200, help="validation prompts of the held-out accuracy")
    p.add_argument("--data", default=DPO_DATA, help="DPO trajectory dataset (collected if missing)")
    p.add_argument("--collect", default="{samples: 8, limit: 1024, temperature: 0.7}",
                   help="DPO collection settings when --data is missing (the recipe's)")
    p.add_argument("--dpo-positive-lambda", type=float, default=0.0,
                   help="ours only: TRL 1.16 has no DPO-Positive, so 0 (plain DPO) keeps the work equal")
    p.add_argument("--grpo", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"change a GRPO recipe setting on both sides, one of {SHARED_SETTINGS['grpo']}")
    p.add_argument("--dpo", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"change a DPO recipe setting on both sides, one of {SHARED_SETTINGS['dpo']}")
    p.add_argument("--recipes", default="recipes",
                   help="the recipe folder both sides read (relative to the repository), e.g. recipes/smollm2")
    p.add_argument("--workdir", default="runs/bench/vs_trl")
    p.add_argument("--output", default=None, help="JSON of every run (default: WORKDIR/results.json)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of every run (default: torch's; 1 on a crowded machine)")
    p.add_argument("--table", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="only print the table of earlier results (several files are joined)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.table:
        saved = [json.loads(Path(f).read_text()) for f in args.table]
        print(table([r for s in saved for r in s["runs"]], saved[0]["start_accuracy"]))
        return 0
    missing = [m for m in args.methods if not recipe_file(m, args.recipes).is_file()]
    if missing:
        raise SystemExit(f"--recipes {args.recipes} has no recipe for {', '.join(missing)} "
                         f"(no {', '.join(str(recipe_file(m, args.recipes)) for m in missing)}); "
                         f"pass --methods with the methods it has")
    overrides = {m: parse_overrides(m, getattr(args, m)) for m in SHARED_SETTINGS}
    work = (REPO / args.workdir).resolve()
    data = str((REPO / args.data).resolve())
    base = {"eval_limit": args.eval_limit, "data": data, "dpo_positive_lambda": args.dpo_positive_lambda,
            "threads": args.threads, "batches": 1, "recipes": args.recipes}
    steps = {"grpo": args.steps or (recipe_max_steps("grpo", args.recipes) if "grpo" in args.methods else 0)}
    hp = recipe_init_args("grpo", overrides["grpo"], args.recipes) if "grpo" in args.methods else {}
    # an iteration is indivisible in both loops: rollout, then epochs x minibatches optimiser steps
    if "grpo" in args.methods:
        per_iteration = -(-hp["prompts_per_iteration"] * hp["samples_per_prompt"] // hp["minibatch_size"]) \
            * hp["epochs_per_iteration"]
    if "grpo" in args.methods and steps["grpo"] % per_iteration:
        raise SystemExit(f"--steps {steps['grpo']}: GRPO makes {per_iteration} optimiser steps per iteration; "
                         f"use a multiple of {per_iteration}")
    try:
        import trl  # noqa: F401
    except ImportError:
        print(TRL_HINT, file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    if "dpo" in args.methods:
        prep = spawn({**base, "kind": "pairs", "method": "dpo", "seed": 0, "overrides": overrides["dpo"],
                      "collect": args.collect,
                      "rundir": str(work / "pairs"), "pairs": str(work / "dpo_pairs.json")}, args.timeout)
        steps["dpo"] = args.steps or prep["batches"]
        base["batches"] = prep["batches"]
        print(f"DPO: {prep['pairs']} pairs, {prep['batches']} batches per epoch", flush=True)
    else:
        prep = spawn({**base, "kind": "start", "method": args.methods[0], "seed": 0}, args.timeout)
    start = prep["accuracy"]
    print(f"start policy: held-out greedy accuracy {start:.3f} on {args.eval_limit} validation prompts", flush=True)
    results = []
    for seed in args.seeds:
        for method in args.methods:
            for kind, framework in (("ours", "lit_reason"), ("trl", "trl")):
                spec = {**base, "kind": kind, "method": method, "seed": seed, "steps": steps[method],
                        "overrides": overrides[method],
                        "rundir": str(work / f"{method}-{framework}-s{seed}"), "pairs": str(work / "dpo_pairs.json")}
                r = {"method": method, "framework": framework, "seed": seed, **spawn(spec, args.timeout)}
                results.append(r)
                print(f"{method} {framework} seed {seed}: {r}", flush=True)
    out = Path(args.output) if args.output else work / "results.json"
    out.write_text(json.dumps({"start_accuracy": start, "runs": results}, indent=1))
    print(table(results, start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
