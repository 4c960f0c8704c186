"""Every GPU recipe (``recipes/gpu/*.yaml``, found by glob) runs on CPU for one or two optimiser steps.

The recipe file goes through the real CLI (:func:`lit_reason.cli.run_lightning_cli`, in this
process) *verbatim* as the first ``--config``, so a key the code does not know fails here. A second
``--config`` written by :func:`cpu_overrides` swaps only what a CPU cannot run:

* the policy -> a tiny stand-in of the recipe's architecture family (the recipe's
  ``# standin: <family>`` line; :mod:`lit_reason.models.standin`), loaded from a folder;
* accelerator cpu, 1 device, precision ``32-true`` (the recipe's ``bf16-mixed`` is still parsed
  and validated), the recipe's ``ModelParallelStrategy`` (FSDP2) with one process over gloo (or
  ``auto``, see :data:`STRATEGY`), 1-2 optimiser steps;
* sizes: prompts/samples/batches, 16 new tokens, K = 2 rollouts; callbacks keep their classes and
  the recipe's other arguments, with small probe/eval sizes and value calibration at the end only;
  W&B is disabled (the ``WandbLogger`` is still built);
* the task's data -> real GSM8K rows (from the shared data) whose answer is 4, which the stand-in
  (steered towards the token "4") sometimes gets right, so rewards differ and every method has a
  non-zero gradient.

Pipelines are followed: a recipe whose policy or GVM is another GPU recipe's export (OREO's
policy = the SFT recipe's ``policy/``, DVPO's ``gvm`` = stage 1's ``gvm/``) trains on what that
recipe's CPU run exported. Each run must end with ``global_step >= 1``, a trainable parameter
changed, its exports and checkpoints written. Marked slow (CI runs them).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
GPU_DIR = REPO / "recipes" / "gpu"
GPU_RECIPES = sorted(p.name for p in GPU_DIR.glob("*.yaml"))
ROOT_VAR = "${trainer.default_root_dir}"
# the strategy of the CPU runs: the recipe's ModelParallelStrategy (FSDP2) with one process (default),
# or `auto` (LIT_REASON_TEST_STRATEGY=auto); a recipe on DDP runs with `auto`
STRATEGY = os.environ.get("LIT_REASON_TEST_STRATEGY", "model_parallel")
STANDIN_ANSWER = "4"  # the stand-in is steered towards this token; the task rows have this answer

# small sizes per callback class (only arguments the recipe already sets are replaced)
CALLBACK_SIZES = {
    "EvalAccuracy": {"limit": 2, "max_new_tokens": 16, "batch_size": 8, "every_n_steps": None},
    "ValueCalibration": {"probe_size": 2, "mc_rollouts": 2, "rank_states": 1, "rank_alternatives": 2,
                         "max_new_tokens": 16, "batch_size": 16, "every_n_steps": None},
    "ModelCheckpoint": {"every_n_train_steps": 1},
}


class TrainableSnapshot(Callback):
    """Copies every trainable parameter at train start; at train end, records which changed."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_end(self, trainer, pl_module) -> None:
        now = dict(pl_module.named_parameters())
        self.changed = [n for n, p in self.before.items() if not torch.equal(p, now[n].detach())]


def recipe_header(name: str) -> str:
    text = (GPU_DIR / name).read_text()
    return text[: text.index("\nseed_everything")] if "\nseed_everything" in text else text


def standin_family(name: str) -> str:
    match = re.search(r"^# standin: (\w+)\s*$", recipe_header(name), re.M)
    assert match, f"recipes/gpu/{name}: no `# standin: <family>` line naming the stand-in's architecture family"
    return match.group(1)


def load_recipe(name: str) -> dict:
    return yaml.safe_load((GPU_DIR / name).read_text())


def export_dirs(recipe: dict) -> dict[str, str]:
    """``{path the recipe exports to: "policy" | "value"}`` with the recipe's own run folder."""
    root = recipe["trainer"]["default_root_dir"]
    out = {}
    for cb in recipe["trainer"].get("callbacks") or []:
        if cb["class_path"].endswith("ExportPolicy"):
            for key, kind in (("dirpath", "policy"), ("value_dirpath", "value")):
                if cb.get("init_args", {}).get(key):
                    out[cb["init_args"][key].replace(ROOT_VAR, root)] = kind
    return out


def producer_of(path: str) -> tuple[str, str] | None:
    """The GPU recipe (and the export kind) that writes ``path``, if any."""
    for other in GPU_RECIPES:
        kind = export_dirs(load_recipe(other)).get(path)
        if kind:
            return other, kind
    return None


def method_class(recipe: dict):
    import importlib

    module, _, cls = recipe["model"]["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), cls)


def shrunk_callbacks(recipe: dict) -> list[dict]:
    out = []
    for cb in recipe["trainer"].get("callbacks") or []:
        args = dict(cb.get("init_args") or {})
        kind = cb["class_path"].rpartition(".")[2]
        for key, value in CALLBACK_SIZES.get(kind, {}).items():
            if key in args:
                args[key] = value
        if kind == "ValueCalibration":
            args["at_start"] = False  # the calibration at the end exercises the same path
        out.append({"class_path": cb["class_path"], "init_args": args})
    out.append({"class_path": f"{__name__}.TrainableSnapshot"})
    return out


def cpu_overrides(name: str, policy: str, data: Path, root: Path, gvm: str | None) -> dict:
    """The second ``--config`` of a CPU run (see the module doc)."""
    from lit_reason.methods.dvpo_gvm import DVPOGVM
    from lit_reason.methods.offline import OfflineRL
    from lit_reason.methods.online import OnlineRL
    from lit_reason.methods.oreo import ValueOfflineRL
    from lit_reason.methods.sft import SFT

    recipe = load_recipe(name)
    cls = method_class(recipe)
    args = recipe["model"]["init_args"]
    init = {"policy": policy, "task": {**args["task"], "path": str(data)}}
    trainer = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32-true", "max_steps": 1,
               "default_root_dir": str(root), "enable_progress_bar": False, "callbacks": shrunk_callbacks(recipe)}
    if STRATEGY == "auto" or not recipe["trainer"]["strategy"]["class_path"].endswith("ModelParallelStrategy"):
        trainer["strategy"] = "auto"
    else:
        trainer["strategy"] = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                               "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 1}}
    if issubclass(cls, OnlineRL):
        # one iteration of 2 prompts x 4 samples = one optimiser step
        init.update(prompts_per_iteration=2, samples_per_prompt=4, minibatch_size=8, epochs_per_iteration=1,
                    max_new_tokens=16, rollout_batch_size=16)
        if "mc_rollouts" in args:
            init["mc_rollouts"] = 2
        if gvm is not None:
            init["gvm"] = gvm
    elif issubclass(cls, OfflineRL):
        # a collection of 4 prompts x 4 samples (the recipe's sampling settings) and one batch
        init.update(data=str(root / "data"), collect={**args["collect"], "samples": 4, "limit": 4, "batch_size": 16},
                    batch_size=4, max_new_tokens=16, rollout_batch_size=16)
        if issubclass(cls, (ValueOfflineRL, DVPOGVM)):
            trainer["max_steps"] = 2  # two optimiser steps per batch (critic + policy; DVPO's 2 epochs per batch)
    elif issubclass(cls, SFT):
        init.update(batch_size=2, eval_limit=2)
        trainer["accumulate_grad_batches"] = 1
    else:
        raise AssertionError(f"recipes/gpu/{name}: no CPU brief for {cls.__name__}; add one to this test")
    return {"trainer": trainer, "model": {"init_args": init}}


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, str]:
    from lit_reason.models.standin import CHAT_TEMPLATE, FAMILIES, build_standin

    root = tmp_path_factory.mktemp("standins")
    # Qwen2's real tokenizers carry a chat template (the Qwen recipes prompt in chat format); Llama's here do not
    return {f: str(build_standin(f, root / f, chat_template=CHAT_TEMPLATE if f == "qwen2" else None,
                                 token_logits={STANDIN_ANSWER: 4.0})) for f in FAMILIES}


@pytest.fixture(scope="module")
def gsm8k_rows(tmp_path_factory, data_dir) -> Path:
    """A GSM8K folder of real rows whose answer is 4: train (16), validation (8) and test (8)."""
    from lit_reason.tasks.jsonl import read_jsonl

    def fours(split: str) -> list[dict]:
        rows = read_jsonl(data_dir / "gsm8k" / f"{split}.jsonl", ("question", "answer"))
        return [r for r in rows if r["answer"].rsplit("####", 1)[1].strip() == STANDIN_ANSWER]

    train, test = fours("train"), fours("test")
    folder = tmp_path_factory.mktemp("gsm8k_fours")
    for split, rows in (("train", train[:16]), ("validation", train[16:24]), ("test", test[:8])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory, standins, gsm8k_rows, single_torch_thread, monkeypatch_module):
    """Runs a GPU recipe once per module (on demand, producers before consumers); returns its result."""
    from lit_reason.cli import run_lightning_cli

    done: dict[str, dict] = {}

    def exported_by_cpu_run(path: str) -> str:
        """Where the CPU run of the recipe exporting ``path`` (a path under its run folder) put it."""
        producer = producer_of(path)[0]
        recipe_root = load_recipe(producer)["trainer"]["default_root_dir"]
        return str(Path(run(producer)["root"]) / Path(path).relative_to(recipe_root))

    def run(name: str) -> dict:
        if name in done:
            return done[name]
        args = load_recipe(name)["model"]["init_args"]
        policy, gvm = standins[standin_family(name)], None
        if producer_of(str(args["policy"])):  # e.g. OREO's policy = the SFT recipe's export
            policy = exported_by_cpu_run(str(args["policy"]))
        if args.get("gvm"):  # DVPO stage 2's GVM = stage 1's export
            assert producer_of(str(args["gvm"])), f"recipes/gpu/{name}: gvm {args['gvm']} is no GPU recipe's export"
            gvm = exported_by_cpu_run(str(args["gvm"]))
        root = tmp_path_factory.mktemp(name.removesuffix(".yaml"))
        overrides = root / "cpu_overrides.yaml"
        overrides.write_text(yaml.safe_dump(cpu_overrides(name, policy, gsm8k_rows, root / "run", gvm)))
        # sys.argv as the CLI would see it (pytest's own arguments would make LightningCLI warn)
        monkeypatch_module.setattr("sys.argv", ["lit_reason"])
        env, started = dict(os.environ), time.perf_counter()
        try:
            cli = run_lightning_cli(["fit", "--config", str(GPU_DIR / name), "--config", str(overrides)])
        finally:
            _leave_no_trace(env)
        snapshot = next(c for c in cli.trainer.callbacks if isinstance(c, TrainableSnapshot))
        done[name] = {"root": str(root / "run"), "changed": snapshot.changed,
                      "global_step": cli.trainer.global_step, "seconds": time.perf_counter() - started}
        print(f"{name}: {done[name]['seconds']:.1f} s, {done[name]['global_step']} optimiser steps, "
              f"{len(snapshot.changed)} parameter tensors changed")
        return done[name]

    return run


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    # the recipes' WandbLogger is parsed and built, but W&B itself is off: an offline run costs ~8 s
    # of start-up per recipe here, and tests/test_recipes.py covers offline W&B runs
    mp.setenv("WANDB_MODE", "disabled")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    yield mp
    mp.undo()
    import wandb

    # wandb's process-wide settings singleton keeps the mode it was set up with ("disabled"): reset
    # it, or a later test's offline WandbLogger in this process writes nothing
    wandb.teardown()


def _leave_no_trace(env: dict[str, str]) -> None:
    """Undoes what an in-process run leaves behind for the next test in this process."""
    import wandb

    if wandb.run is not None:  # a second WandbLogger would otherwise attach to this run
        wandb.finish()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # ModelParallelStrategy's one-process group
    os.environ.clear()  # MASTER_ADDR/PORT and rank variables the strategy set
    os.environ.update(env)


def test_gpu_recipes_exist_and_open_with_their_setup():
    assert GPU_RECIPES, "recipes/gpu holds no recipe"
    for name in GPU_RECIPES:
        header = recipe_header(name)
        assert header.startswith("#"), name
        assert f"python -m lit_reason fit --config recipes/gpu/{name}" in header, f"{name}: no exact command line"
        assert "arxiv" in header.lower(), f"{name}: no paper reference"
        assert re.search(r"GPUs: ", header), f"{name}: no GPU count"
        standin_family(name)


def test_gpu_recipes_run_on_gpus_with_bf16_and_fsdp2():
    for name in GPU_RECIPES:
        trainer = load_recipe(name)["trainer"]
        assert trainer["accelerator"] == "gpu" and trainer["devices"] >= 1, name
        assert trainer["precision"] in ("bf16-mixed", "bf16-true"), name
        if trainer["precision"] == "bf16-mixed":
            # bf16-mixed keeps fp32 master weights only if the model loads in fp32 (bf16 checkpoints do not)
            assert load_recipe(name)["model"]["init_args"].get("dtype") in ("float32", "fp32"), name
        strategy = trainer["strategy"]
        if strategy["class_path"].endswith("DDPStrategy"):
            # allowed where FSDP2 cannot run the recipe yet; the header must say why
            assert "not FSDP2" in recipe_header(name), f"{name}: DDP without a reason in its header"
            continue
        assert strategy["class_path"].endswith("ModelParallelStrategy"), name
        # FSDP over every process: recipes/fsdp.yaml's interpolation on one node, else the world size
        dp = strategy["init_args"]["data_parallel_size"]
        assert (dp == ROOT_VAR.replace("default_root_dir", "devices") and trainer.get("num_nodes", 1) == 1
                or dp == trainer["devices"] * trainer.get("num_nodes", 1)), f"{name}: data_parallel_size {dp}"


def test_a_lora_variant_exists():
    assert any(load_recipe(n)["model"]["init_args"].get("lora") for n in GPU_RECIPES), "no GPU recipe trains LoRA"


def test_standin_families_build_their_real_classes(standins):
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(standins["llama"]).architectures == ["LlamaForCausalLM"]
    assert AutoConfig.from_pretrained(standins["qwen2"]).architectures == ["Qwen2ForCausalLM"]


@pytest.mark.slow
@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipe_runs_on_a_cpu_standin(name, cpu_runs):
    result = cpu_runs(name)
    root = Path(result["root"])
    assert result["global_step"] >= 1, f"{name}: no optimiser step ran"
    assert result["changed"], f"{name}: no trainable parameter changed in {result['global_step']} optimiser steps"
    recipe = load_recipe(name)
    for path, kind in export_dirs(recipe).items():
        exported = root / Path(path).relative_to(recipe["trainer"]["default_root_dir"])
        marker = "config.json" if kind == "policy" else "value_head.json"
        assert (exported / marker).is_file(), f"{name}: export {exported} missing"
    if any(cb["class_path"].endswith("ModelCheckpoint") for cb in recipe["trainer"].get("callbacks") or []):
        assert list(root.rglob("*.ckpt")), f"{name}: ModelCheckpoint wrote nothing"
    assert list(root.rglob("metrics.csv")), f"{name}: nothing logged"
