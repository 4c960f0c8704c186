"""One name per concept across the methods (README "Names"; lit_reason/methods/base.py).

* A renamed argument's old key fails when the config is parsed, naming the key, before any model
  is built (``val_limit`` became ``eval_limit``; offline ``warmup_ratio`` became ``warmup_steps``).
* The shared arguments live once, in :class:`~lit_reason.methods.base.RLModule`, and every online
  and offline method still saves all of them as hyper-parameters (a checkpoint reload re-creates the
  module from them).
* First-use collection runs on the device the module asks for (:func:`load_collecting_policy`).
"""

from __future__ import annotations

import inspect

import pytest
from conftest import one_step_config

from lit_reason.methods import DPO, GRPO
from lit_reason.methods.base import RLModule
from lit_reason.methods.offline import OfflineRL
from lit_reason.methods.online import OnlineRL

SFT_CONFIG = """\
trainer: {accelerator: cpu, devices: 1, max_steps: 1, logger: false, enable_checkpointing: false}
model:
  class_path: lit_reason.methods.SFT
  init_args:
    policy: embedded:tiny
    task: {name: arithmetic, n_train: 8, n_validation: 4, n_test: 4}
"""

GRPO_CONFIG = one_step_config("GRPO")


DPO_CONFIG = one_step_config("DPO")


@pytest.mark.parametrize("config,old_key,name", [
    (SFT_CONFIG, ["--model.init_args.val_limit", "16"], "val_limit"),  # on the command line
    (SFT_CONFIG + "    val_limit: 16\n", [], "val_limit"),  # in the YAML
    (GRPO_CONFIG, ["--model.init_args.val_limit", "16"], "val_limit"),  # the RL methods never had it either
    (DPO_CONFIG, ["--model.init_args.warmup_ratio", "0.1"], "warmup_ratio"),
], ids=["sft-cli", "sft-yaml", "grpo-cli", "dpo-warmup-ratio"])
def test_an_old_key_fails_at_parse_time_naming_it(tmp_path, capsys, built_modules, config, old_key, name):
    from lit_reason.cli import main

    built = built_modules
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(config)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(recipe), *old_key])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"'{name}' is not accepted" in err, err[-2000:]
    assert built == [], f"built before failing: {built}"


def test_shared_arguments_are_declared_once_and_saved_by_every_rl_method(tiny_policy_dir):
    shared = [n for n in inspect.signature(RLModule.__init__).parameters if n not in ("self", "task")]
    assert len(shared) == 14
    for cls in (OnlineRL, OfflineRL):
        # the loop modules forward the shared arguments, they do not redeclare them (lr: own default)
        own = set(inspect.signature(cls.__init__).parameters)
        assert own & set(shared) == {"lr"}, cls
    online = GRPO(policy=str(tiny_policy_dir), max_new_tokens=8, eval_limit=3, rollout_batch_size=5, seed=7)
    offline = DPO(policy=str(tiny_policy_dir), max_new_tokens=8, eval_limit=3)
    for module in (online, offline):
        missing = set(shared) - set(module.hparams)
        assert not missing, f"{type(module).__name__} does not save {missing}"
        assert module.hparams.eval_limit == 3 and module.hparams.max_new_tokens == 8
        assert module.hparams.weight_decay == 0.0  # a default of the base, saved too
    assert (online.hparams.lr, offline.hparams.lr) == (1e-4, 1e-5)  # each loop's own default
    assert online.engine.batch_size == 5 and online.hparams.seed == 7  # the shared values reach the loop
    assert len(online._eval_loader("validation").dataset) == 3


def test_collection_loads_the_policy_on_the_requested_device(tiny_policy_dir):
    from lit_reason.data.collect import load_collecting_policy

    model, _ = load_collecting_policy(str(tiny_policy_dir))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    # "meta" is the one other device a CPU-only machine has: every parameter must follow the request
    model, _ = load_collecting_policy(str(tiny_policy_dir), device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.parametrize("warmup_steps,expected", [(None, 3), (10, 10), (0, 0)])
def test_offline_warmup_is_in_steps_defaulting_to_3_percent_of_the_run(tiny_policy_dir, warmup_steps, expected):
    import lightning.pytorch as pl

    module = DPO(policy=str(tiny_policy_dir), max_new_tokens=8, warmup_steps=warmup_steps)
    trainer = pl.Trainer(max_steps=100, accelerator="cpu", logger=False, enable_checkpointing=False)
    module.trainer = trainer
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lr = module.hparams.lr
    # warmup of W steps: lr * (s + 1) / W for s < W, then the full lr at s = W (cosine starts at 1)
    factors = [scheduler.lr_lambdas[0](s) for s in range(expected + 1)]
    if expected:
        assert factors[:expected] == pytest.approx([(s + 1) / expected for s in range(expected)])
    assert factors[expected] == pytest.approx(1.0)
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(lr * factors[0])


METRIC_PREFIXES = ("train", "val", "test", "time", "value", "gvm", "data", "rounds", "eval")


def test_every_metric_name_the_docs_give_is_one_the_code_logs():
    """A metric README or docs/ names (`prefix/name`) is a string the package logs: either the literal
    key, or ``"name"`` where the package builds ``f"prefix/{...}"`` keys (calibration metrics come
    from lit_reason.metrics.calibration's dict, prefixed by the callback)."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    source = "\n".join(p.read_text() for p in (repo / "lit_reason").rglob("*.py"))
    pattern = re.compile(r"`((?:%s)/[a-z_0-9]+)`" % "|".join(METRIC_PREFIXES))
    documented = set()
    for doc in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            if "was `" not in line:  # the rename notes name the old keys on purpose
                documented.update(pattern.findall(line))
    assert "val/accuracy" in documented and "value/mae_vs_mc" in documented

    def logged(name: str) -> bool:
        prefix, key = name.split("/", 1)
        return f'"{name}"' in source or (f'f"{prefix}/{{' in source and f'"{key}"' in source)

    missing = sorted(n for n in documented if not logged(n))
    assert not missing, f"documented but never logged: {missing}"
