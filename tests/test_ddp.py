"""Multi-process training through Lightning's own strategy (DDP over gloo on CPU, 2 processes).

Each rank rolls out its own share of prompts; gradients are all-reduced by DDP, so after the
updates both ranks must hold identical policy weights, and advantage whitening and evaluation
counts are global.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, lightning.pytorch as pl
    from lit_reason.callbacks import EvalAccuracy
    from lit_reason.methods import {cls}
    policy, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    module = {cls}(policy=policy, task={{"name": "arithmetic", "n_train": 64, "n_validation": 8, "n_test": 8}},
                   prompts_per_iteration=2, samples_per_prompt=2, minibatch_size=4, max_new_tokens=10,
                   progress=False, seed=0, {extra})
    eos = module.tokenizer.eos_token_id
    module.policy.lm_head.register_forward_hook(lambda m, i, o: o.index_add(-1, torch.tensor([eos]), torch.full_like(o[..., :1], 3.0)))
    evaluator = EvalAccuracy(limit=8, max_new_tokens=10)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[evaluator])
    trainer.fit(module)
    checksum = sum(float(p.double().sum()) for p in module.policy.parameters())
    gvm = getattr(module, "gvm", None)  # DVPO's frozen value model
    gvm_checksum = sum(float(p.double().sum()) for p in gvm.parameters()) if gvm is not None else None
    gvm_frozen = gvm is not None and not gvm.training and all(p.grad is None for p in gvm.parameters())
    with open(f"{{out}}.rank{{trainer.global_rank}}.json", "w") as f:
        json.dump({{"checksum": checksum, "step": trainer.global_step, "history": evaluator.history,
                   "world": trainer.world_size, "gvm_checksum": gvm_checksum, "gvm_frozen": gvm_frozen}}, f)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("cls,extra", [("GRPO", ""), ("VinePPO", "mc_rollouts=2"),
                                       ("DVPO", "gvm=GVM_DIR, use_task_reward=True, whiten_values=False")])
def test_ddp_two_processes_stay_in_sync(cls, extra, tmp_path, tiny_policy_dir):
    gvm_checksum = None
    if "GVM_DIR" in extra:  # a saved value model as DVPO's frozen GVM
        from lit_reason.models.loading import load_tokenizer
        from lit_reason.models.value import ValueModel

        gvm = ValueModel.from_policy_name(tiny_policy_dir, bias=True)
        gvm.save(tmp_path / "gvm", tokenizer=load_tokenizer(tiny_policy_dir))
        gvm_checksum = sum(float(p.double().sum()) for p in gvm.parameters())
        extra = extra.replace("GVM_DIR", repr(str(tmp_path / "gvm")))
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(cls=cls, extra=extra))
    out = tmp_path / "result"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, str(script), tiny_policy_dir, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads(Path(f"{out}.rank0.json").read_text())
    r1 = json.loads(Path(f"{out}.rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert r0["step"] == r1["step"] >= 2
    # DDP all-reduces gradients: the weights after the updates are the same on both ranks
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=0, abs=1e-6)
    # evaluation sums correct counts over the ranks' shards: both ranks log the same global accuracy
    assert r0["history"] == r1["history"]
    if gvm_checksum is not None:
        # DDP leaves the frozen GVM alone: unchanged, in eval mode and gradient-free on every rank
        assert r0["gvm_frozen"] and r1["gvm_frozen"]
        assert r0["gvm_checksum"] == pytest.approx(gvm_checksum, abs=1e-6)
        assert r1["gvm_checksum"] == pytest.approx(gvm_checksum, abs=1e-6)
