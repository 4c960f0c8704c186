"""FSDP2 through Lightning's ``ModelParallelStrategy``: 2 CPU processes over gloo.

The multi-process runs live in ``tests/fsdp_worker.py`` (one subprocess per scenario, several
methods and checks per run to pay the start-up once). Each method is fitted under DDP and then
under FSDP from the same start and seeds; both roll out the same per-rank prompts and average the
same gradients, so the final parameters must agree to float rounding (tolerance
``PARAM_ATOL``), while under FSDP each rank holds half of every parameter and optimiser state.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_reason.parallel import decoder_layers, gathered, mixed_precision_policy

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "fsdp_worker.py"
PARAM_ATOL = 1e-6  # measured: <= 1.2e-7 (fp32 reduction order of the gradient clip norm and all-reduce)


def run_worker(scenario: str, out: Path, *args: str, expect_rc: int = 0, timeout: int = 420,
               ranks: tuple[int, ...] = (0, 1)) -> list[dict]:
    """Runs one worker scenario (a fresh interpreter; Lightning launches the second rank) and returns
    each rank's JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, str(WORKER), scenario, str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect_rc, proc.stderr[-4000:]
    if expect_rc != 0:
        return []
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in ranks]


def check_sharded_run(name: str, ranks: list[dict]) -> None:
    """What every method must show under FSDP (see the module doc); prints the measured fractions."""
    r0, r1 = (r[name] for r in ranks)
    for r in (r0, r1):
        assert r["sharded"], f"{name}: not every declared model was sharded"
        assert r["step"] == r["ddp"]["step"] > 0
        # each rank holds about half of the trainable parameters and of the optimiser state ...
        assert r["trainable_fraction"] == pytest.approx(0.5, abs=0.01)
        assert r["optimizer_fraction"] == pytest.approx(0.5, abs=0.01)
        # ... the frozen models are sharded too, get no gradient, no optimiser state and stay unchanged
        assert r["frozen_no_grad"] and not r["frozen_in_optimizer"]
        assert all(v == 0.0 for v in r["frozen_change"].values()), r["frozen_change"]
        if r["frozen_names"]:
            assert r["frozen_fraction"] == pytest.approx(0.5, abs=0.01)
        # the gathered parameters after the same steps on the same data match the DDP run
        assert r["max_param_diff"] <= PARAM_ATOL, (name, r["max_param_diff"])
    # the two shards are the whole: fractions of one model sum to exactly one
    assert r0["trainable_fraction"] + r1["trainable_fraction"] == pytest.approx(1.0, abs=1e-12)
    assert r0["optimizer_fraction"] + r1["optimizer_fraction"] == pytest.approx(1.0, abs=1e-12)
    print(f"\n{name}: models {r0['models']} ({r0['trainable_numel']} params), frozen {r0['frozen_names']}; "
          f"rank 0/1 hold {r0['trainable_fraction']:.4f}/{r1['trainable_fraction']:.4f} of the trainable params, "
          f"{r0['optimizer_fraction']:.4f}/{r1['optimizer_fraction']:.4f} of the optimiser state "
          f"({r0['optimizer_numel']} values), frozen {r0['frozen_fraction']}; max |FSDP - DDP| = {r0['max_param_diff']:.2e}")


# ---- in-process pieces (no process group) ------------------------------------------------------
def test_decoder_layers_of_policy_lora_policy_and_value_model(tiny_policy_dir):
    from lit_reason.models.policy import build_policy
    from lit_reason.models.value import ValueModel

    policy, _ = build_policy(tiny_policy_dir)
    lora, _ = build_policy(tiny_policy_dir, lora={"r": 2, "lora_alpha": 4, "target_modules": "all-linear"})
    value = ValueModel.from_policy_name(tiny_policy_dir)
    for model in (policy, lora, value):
        layers = decoder_layers(model)
        assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2  # the fixture has 2 layers
    for m in policy.modules():
        if hasattr(m, "_no_split_modules"):
            m._no_split_modules = None
    with pytest.raises(ValueError, match=r"decoder layers of the critic \(LlamaForCausalLM\).*`critic`"):
        decoder_layers(policy, "critic")


def test_gathered_is_a_true_no_op_when_nothing_is_sharded(tiny_model):
    with gathered(tiny_model, None):
        assert torch.is_grad_enabled()  # unsharded (DDP, one process): nothing changes, not even grad mode


def test_mixed_precision_policy():
    assert mixed_precision_policy("bf16-mixed", "cpu") is None  # fp32 on the CPU
    assert mixed_precision_policy("32-true", "cuda") is None
    mp = mixed_precision_policy("bf16-mixed", "cuda")
    assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32  # gradients reduced in fp32
    assert mixed_precision_policy("bf16-true", "cuda").param_dtype == torch.bfloat16


@pytest.mark.slow  # the CLI's imports: ~10 s
def test_fsdp_fragment_composes_with_a_recipe():
    proc = subprocess.run([sys.executable, "-m", "lit_reason", "fit", "--config", "recipes/ppo.yaml", "--config",
                           "recipes/fsdp.yaml", "--trainer.devices", "4", "--print_config"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "class_path: lightning.pytorch.strategies.ModelParallelStrategy" in text
    assert "data_parallel_size: 4" in text and "tensor_parallel_size: 1" in text  # follows --trainer.devices
    assert "class_path: lit_reason.methods.PPO" in text


# ---- 2 processes -------------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp_online_methods_match_ddp_and_roll_out_from_the_sharded_policy(tmp_path, tiny_policy_dir):
    from lit_reason.models.loading import load_tokenizer
    from lit_reason.models.value import ValueModel

    ValueModel.from_policy_name(tiny_policy_dir, bias=True).save(tmp_path / "gvm", tokenizer=load_tokenizer(tiny_policy_dir))
    ranks = run_worker("online", tmp_path / "res", tiny_policy_dir, str(tmp_path / "gvm"))
    for name in ("VinePPO", "PPO", "DVPO"):
        check_sharded_run(name, ranks)
    assert ranks[0]["PPO"]["models"] == ["critic", "policy"]
    assert ranks[0]["DVPO"]["frozen_names"] == ["gvm", "reference"]
    for r in ranks:
        ppo = r["PPO"]
        # sampling, greedy decoding, MC values, next steps, beam search and MCTS from the sharded
        # policy give exactly what an unsharded copy of the same weights gives with the same seeds
        assert ppo["rollouts_sharded"] == ppo["rollouts_unsharded"]
        assert any(len(ids) > 1 for ids in ppo["rollouts_sharded"]["greedy"])  # not a trivial EOS-only decode
        # value calibration and greedy evaluation (uneven shards: 3 and 2 prompts) agree with DDP
        assert ppo["calibration"] == ppo["ddp"]["calibration"] and len(ppo["calibration"]) == 2
        assert ppo["eval"] == ppo["ddp"]["eval"]
    # inside one gather the ranks ran different numbers of forwards (2 vs up to 16 decode steps)
    # and then met at a collective: no per-token all-gather, no deadlock
    assert ranks[0]["PPO"]["uneven_forwards"] == 2 < ranks[1]["PPO"]["uneven_forwards"]


@pytest.mark.slow
def test_fsdp_sft_and_oreo_match_ddp_and_export_loads_on_one_process(tmp_path, tiny_policy_dir, embedded_arithmetic):
    ranks = run_worker("offline", tmp_path / "res", tiny_policy_dir, str(tmp_path), str(embedded_arithmetic))
    check_sharded_run("SFT", ranks)
    check_sharded_run("OREO", ranks)
    assert ranks[0]["OREO"]["models"] == ["policy", "value_model"]
    oreo = ranks[0]["OREO"]
    # the exported value model (written once by rank 0 from the gathered state) reloads equal
    assert oreo["value_loaded"] == pytest.approx(oreo["value_live"], abs=1e-6)
    # the exported policy folder: `evaluate` on one process gives the in-training greedy accuracy
    result = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "lit_reason", "evaluate", "--policy", str(tmp_path / "export/policy"),
                           "--task", "arithmetic", "--split", "validation", "--limit", "8", "--max-new-tokens", "64",
                           "--output", str(result)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads(result.read_text())
    from lit_reason.tasks import get_task

    task = get_task("arithmetic")  # the worker's OREO task: the same 8 validation prompts
    assert [r["prompt"] for r in evaluated["records"]] == [task.prompt(e) for e in task.examples("validation")[:8]]
    final_step, final_acc = oreo["eval"][-1]
    assert final_step == oreo["step"]
    assert evaluated["accuracy"] == pytest.approx(final_acc, abs=1e-9)
    assert 0.0 < final_acc < 1.0  # the SFT'd start policy: a non-trivial accuracy to reproduce
    print(f"\nOREO export: in-training greedy accuracy {final_acc:.3f} = evaluate {evaluated['accuracy']:.3f}")


def max_abs_diff(a: dict, b: dict) -> float:
    return max(max(abs(x - y) for x, y in zip(a[k], b[k])) for k in a)


@pytest.mark.slow
def test_fsdp_killed_after_a_checkpoint_resumes_to_the_same_end(tmp_path, tiny_policy_dir):
    """SFT (epoch-boundary checkpoint) and VinePPO (mid-epoch, with ``ResumeState``'s RNG/sampler
    state), each killed with ``os._exit`` right after a sharded checkpoint and resumed."""
    work = str(tmp_path)
    # process 1: SFT uninterrupted, then SFT killed at the start of epoch 2 (after epoch 1's checkpoint)
    run_worker("resume", tmp_path / "p1", tiny_policy_dir, work, "full+kill", expect_rc=17)
    killed_csv = tmp_path / "killed/csv/version_0/metrics.csv"
    rows_before_kill = list(csv.DictReader(killed_csv.open()))
    # process 2: SFT resumed; VinePPO uninterrupted, then killed after its step-2 checkpoint
    run_worker("resume", tmp_path / "p2", tiny_policy_dir, work, "resume+ofull+okill", expect_rc=17)
    # process 3: VinePPO resumed; then SFT's and VinePPO's results are compared
    ranks = run_worker("resume", tmp_path / "p3", tiny_policy_dir, work, "oresume")
    for r in (0, 1):
        p1 = json.loads((tmp_path / f"p1.partial.rank{r}.json").read_text())  # what ran before each kill
        p2 = json.loads((tmp_path / f"p2.partial.rank{r}.json").read_text())
        full, resumed = p1["full"], p2["resume"]
        assert resumed["step"] == full["step"] == 8
        assert max_abs_diff(full["params"], resumed["params"]) == 0.0  # CPU, same seeds: bit-identical
        assert ranks[r]["oresume"]["step"] == p2["ofull"]["step"] == 4
        assert max_abs_diff(p2["ofull"]["params"], ranks[r]["oresume"]["params"]) == 0.0
    # SFT's metrics: the killed attempt's rows (steps 0-3) and the resumed attempt's (4-7) are the
    # uninterrupted run's (Lightning's CSVLogger starts metrics.csv afresh on resume, hence the copy)
    full_rows = list(csv.DictReader((tmp_path / "full/csv/version_0/metrics.csv").open()))
    resumed_rows = list(csv.DictReader(killed_csv.open()))
    assert len(full_rows) == 8 and [r["step"] for r in rows_before_kill] == ["0", "1", "2", "3"]
    assert rows_before_kill + resumed_rows == full_rows
    # VinePPO's metrics.csv after the resume: ResumeState cuts and continues it as one run
    assert (tmp_path / "okilled/csv/version_0/metrics.csv").read_text() == \
        (tmp_path / "ofull/csv/version_0/metrics.csv").read_text()
    # another world size: the 2-process sharded SFT checkpoint restores on 1 process (DCP reshards)
    (one,) = run_worker("resume", tmp_path / "one", tiny_policy_dir, work, "resume1", ranks=(0,))
    assert one["resume1"]["world"] == 1 and one["resume1"]["step"] == 4
    p1 = json.loads((tmp_path / "p1.partial.rank0.json").read_text())
    assert max_abs_diff(p1["full"]["after_epoch0"], one["resume1"]["params"]) == 0.0


@pytest.mark.slow
def test_fsdp_other_methods_train_and_bad_settings_fail(tmp_path, tiny_policy_dir, embedded_arithmetic):
    ranks = run_worker("smoke", tmp_path / "res", tiny_policy_dir, str(tmp_path), str(embedded_arithmetic))
    expected = {"GRPO": (["policy"], ["reference"]), "RFT": (["policy"], ["reference"]),
                "DPO": (["policy"], ["reference"]), "DQO": (["policy", "value_model"], ["reference"]),
                "DVPOGVM": (["value_model"], ["policy"]), "SFT-LoRA": (["policy"], []),
                "DVO": (["policy"], ["reference"])}
    for r in ranks:
        for name, (models, frozen) in expected.items():
            run = r[name]
            assert run["sharded"] and run["step"] >= 2, (name, run)
            assert (run["models"], run["frozen"]) == (models, frozen), name
            if name != "DVO":  # DVO's 4-simulation search gives all-zero targets here: no gradient
                assert run["changed"] > 0, f"{name}: no trainable parameter changed"
        # DVO: rank 0 re-searched alone with the sharded policy, gathered on both ranks: no deadlock
        assert r["DVO"]["refreshes"] == 1
        # bad settings: one message naming the setting, on every rank
        bad = r["bad"]
        assert "tensor_parallel_size" in bad["tensor_parallel"] and "data_parallel_size" in bad["tensor_parallel"]
        assert "decoder layers of the policy" in bad["no_layers"] and "`policy`" in bad["no_layers"]
    assert ranks[0]["lora_export_params"] == 106816  # merged into the plain tiny model: no adapter left
    assert ranks[0]["lora_adapter_saved"]  # and the adapter alone beside it, as from a one-process run
