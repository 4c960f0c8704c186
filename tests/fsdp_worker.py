"""Worker of ``tests/test_fsdp.py``: 2-process runs on the CPU (gloo), FSDP2 vs DDP.

Run as ``python tests/fsdp_worker.py SCENARIO OUT POLICY [EXTRA]``; Lightning's launcher starts
the second process. Each rank writes ``OUT.rank{r}.json`` with what it measured; the test asserts.

Scenarios:
    ``online``: VinePPO, PPO (critic) and DVPO (frozen GVM at EXTRA), each fitted under DDP and
        then under ``ModelParallelStrategy`` (FSDP2) from the same start and seeds; records the
        largest parameter difference, the fraction of parameters / optimiser state each rank
        holds, the frozen models' gradients and checksums, and (PPO) the rollout checks: sampling,
        Monte Carlo values, next steps, beam search, MCTS and uneven decode lengths per rank
        against an unsharded copy of the same weights.
    ``offline``: SFT and OREO (two optimisers; EXTRA = work folder [, OREO's start policy]), DDP vs
        FSDP; OREO exports policy and value model and evaluates greedily in training.
    ``resume``: SFT under FSDP with a checkpoint per epoch; EXTRA = work folder and ``+``-joined
        phases: ``full`` (2 epochs), ``kill`` (dies at the start of epoch 2, after epoch 1's
        checkpoint), ``resume`` (continues from that checkpoint), ``resume1`` (loads it on 1 process);
        ``ofull`` / ``okill`` / ``oresume``: the same for VinePPO with ``ResumeState``, checkpoint
        every 2 optimiser steps.
    ``smoke``: GRPO, RFT, DPO, DQO, DVPO stage 1, a LoRA SFT (merged export) and DVO (MCTS
        targets, refreshed once by rank 0 from the sharded policy) train briefly
        under FSDP (EXTRA = work folder, the SFT'd start policy of the offline methods); then the
        ``bad`` checks in the same processes.
    ``bad``: ``tensor_parallel_size=2`` and a policy without findable decoder layers are refused,
        each naming the setting.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_reason.parallel import gathered, is_sharded, local_numel

TASK = {"name": "arithmetic", "n_train": 64, "n_validation": 8, "n_test": 8}
ONLINE = dict(task=TASK, prompts_per_iteration=2, samples_per_prompt=2, minibatch_size=4, max_new_tokens=10,
              progress=False, seed=0, lr=1e-3)


def fsdp_strategy() -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def make_trainer(strategy, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**defaults, **kwargs})


def eos_bias(model, eos: int):
    """+3 on the EOS logit, so the untrained tiny policy ends its responses within the short limit."""
    return model.lm_head.register_forward_hook(
        lambda m, i, o: o.index_add(-1, torch.tensor([eos]), torch.full_like(o[..., :1], 3.0)))


def with_eos_bias(module):
    module._eos_hook = eos_bias(module.policy, module.tokenizer.eos_token_id)
    return module


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` as a full tensor on this rank (a collective when sharded)."""
    with gathered(model):
        return {n: p.detach().clone().double() for n, p in model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def checksum(params: dict) -> float:
    return sum(float(v.sum()) for v in params.values())


def optimizer_tensors(trainer):
    return [v for opt in trainer.optimizers for s in opt.state.values() for k, v in s.items()
            if torch.is_tensor(v) and v.dim() > 0]


def fit(mode: str, make_module, trainer_kwargs: dict, after_fit=None) -> dict:
    """Fits a fresh module under ``ddp`` or ``fsdp``; returns the final trainable parameters
    (``_final``) and, under FSDP, what each rank holds and whether the frozen models stayed frozen."""
    pl.seed_everything(0)
    module = make_module()
    frozen_before = {name: checksum(full_params(m)) for name, m in module.frozen_models().items()}
    trainer = make_trainer(fsdp_strategy() if mode == "fsdp" else "ddp_find_unused_parameters_true", **trainer_kwargs)
    trainer.fit(module)
    out = {"_final": {name: full_params(m) for name, m in module.trainable_models().items()},
           "step": trainer.global_step}
    if mode == "fsdp":
        trainable = [p for m in module.trainable_models().values() for p in m.parameters()]
        frozen = [p for m in module.frozen_models().values() for p in m.parameters()]
        loc, tot = local_numel(trainable)
        oloc, otot = local_numel(optimizer_tensors(trainer))
        floc, ftot = local_numel(frozen)
        out.update({
            "models": sorted(module.trainable_models()),
            "sharded": all(is_sharded(m) for m in [*module.trainable_models().values(),
                                                   *module.frozen_models().values()]),
            "trainable_fraction": loc / tot, "trainable_numel": tot,
            "optimizer_fraction": oloc / otot, "optimizer_numel": otot,
            "frozen_names": sorted(module.frozen_models()),
            "frozen_fraction": floc / ftot if ftot else None,
            "frozen_no_grad": all(p.grad is None and not p.requires_grad for p in frozen),
            "frozen_change": {name: abs(checksum(full_params(m)) - frozen_before[name])
                              for name, m in module.frozen_models().items()},
            "frozen_in_optimizer": any(p is q for opt in trainer.optimizers for g in opt.param_groups
                                       for q in g["params"] for p in frozen),
        })
    if after_fit is not None:
        out.update(after_fit(module, trainer))
    return out


def compare(make_module, trainer_kwargs, after_fsdp=None, after_ddp=None) -> dict:
    """DDP then FSDP from the same start and seeds: FSDP's measurements, the DDP run's extras under
    ``ddp`` and the largest difference of any final trainable parameter."""
    kwargs = trainer_kwargs if callable(trainer_kwargs) else (lambda: dict(trainer_kwargs))
    ddp = fit("ddp", make_module, kwargs(), after_ddp)
    res = fit("fsdp", make_module, kwargs(), after_fsdp)
    a, b = ddp.pop("_final"), res.pop("_final")
    res["max_param_diff"] = max(max_diff(a[k], b[k]) for k in a)
    res["ddp"] = ddp
    return res


# ---- rollouts from the sharded policy ----------------------------------------------------------
def rollout_checks(module, trainer) -> dict:
    """Sampling, MC values, next steps, beam search and MCTS from the sharded policy vs an
    unsharded copy of the same weights; then uneven decode lengths per rank inside one gather."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModel, AutoModelForCausalLM

    from lit_reason.models.value import ValueModel
    from lit_reason.rollout.mcts import run_mcts
    from lit_reason.rollout.monte_carlo import mc_values
    from lit_reason.rollout.next_step import sample_next_steps
    from lit_reason.rollout.sampler import RolloutEngine
    from lit_reason.rollout.trajectories import encode_prompts
    from lit_reason.search import value_guided_beam_search, value_model_fn

    rank, tok, task, splitter = trainer.global_rank, module.tokenizer, module.task, module.splitter
    full = get_model_state_dict(module.policy, options=StateDictOptions(full_state_dict=True))
    plain = AutoModelForCausalLM.from_config(module.policy.config)
    plain.load_state_dict({k: v.detach().clone() for k, v in full.items()})
    plain.eval()
    module._eos_hook.remove()  # plain sampling from here on: greedy decodes past the first token
    critic_full = get_model_state_dict(module.critic, options=StateDictOptions(full_state_dict=True))
    critic = ValueModel(AutoModel.from_config(module.critic.trunk.config), module.critic.head.in_features, bias=True)
    critic.load_state_dict({k: v.detach().clone() for k, v in critic_full.items()})
    critic.eval()

    examples = task.examples("train")[rank * 3 : rank * 3 + 3]  # each rank its own prompts
    prompts = encode_prompts(tok, [task.prompt(e) for e in examples])

    def run_all(policy, value_model):
        engine = RolloutEngine(policy, tok, max_new_tokens=12, temperature=1.0, seed=11 + rank)
        out = {"sample": [g.ids for g in engine.sample(prompts, k=2)]}
        engine.reseed(12 + rank)
        out["greedy"] = [g.ids for g in engine.sample(prompts, k=1, temperature=0.0)]
        engine.reseed(13 + rank)
        out["mc"] = mc_values(engine, task, prompts, [[] for _ in prompts], examples, 3).tolist()
        engine.reseed(14 + rank)
        out["next"] = [s.ids for s in sample_next_steps(engine, splitter, prompts, k=2)]
        engine.reseed(15 + rank)
        beams = value_guided_beam_search(engine, value_model_fn(value_model, tok.pad_token_id), prompts, 2,
                                         splitter=splitter, max_steps=3, max_new_tokens=12)
        out["beam"] = [[b.text, round(float(b.value), 5)] for b in beams]
        engine.reseed(16 + rank)
        trees, stats = run_mcts(engine, task, splitter, examples, simulations=3, width=2, seed=rank)
        out["mcts"] = [[len(t.nodes), t.nodes[0].N] for t in trees]
        return out

    with module.rollout_phase():
        sharded = run_all(module.policy, module.critic)
    unsharded = run_all(plain, critic)

    # uneven work per rank inside one gather: rank 0 decodes 2 tokens for 1 prompt, rank 1 up to
    # 16 tokens for 3 prompts; forwards are counted, then a collective proves nobody was left waiting
    calls = [0]
    handle = module.policy.model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    with module.rollout_phase():
        engine = RolloutEngine(module.policy, tok, max_new_tokens=2 if rank == 0 else 16, temperature=1.0, seed=0)
        engine.sample(prompts[:1] if rank == 0 else prompts, k=1)
    handle.remove()
    dist.barrier()
    return {"rollouts_sharded": sharded, "rollouts_unsharded": unsharded, "uneven_forwards": calls[0]}


# ---- scenarios ---------------------------------------------------------------------------------
def scenario_online(policy: str, gvm: str) -> dict:
    from lit_reason.callbacks import EvalAccuracy, ValueCalibration
    from lit_reason.methods import DVPO, PPO, VinePPO

    def make(cls, **kw):
        def build():
            module = cls(policy=policy, **ONLINE, **kw)
            module._eos_hook = eos_bias(module.policy, module.tokenizer.eos_token_id)
            return module
        return build

    callbacks: dict = {}

    def ppo_kwargs():  # fresh callbacks per run, so each fit starts from an empty history
        callbacks["calibration"] = ValueCalibration(probe_size=2, mc_rollouts=2, rank_states=2, rank_alternatives=2,
                                                    max_new_tokens=10, batch_size=8, progress=False)
        callbacks["eval"] = EvalAccuracy(limit=5, max_new_tokens=10)  # 3 prompts on rank 0, 2 on rank 1
        return {"max_steps": 4, "callbacks": list(callbacks.values())}

    def histories(module, trainer):
        return {"calibration": [m for _, m in callbacks["calibration"].history], "eval": callbacks["eval"].history}

    return {
        "VinePPO": compare(make(VinePPO, mc_rollouts=2), {"max_steps": 4}),
        "PPO": compare(make(PPO, critic_lr=1e-3), ppo_kwargs,
                       after_fsdp=lambda m, t: {**histories(m, t), **rollout_checks(m, t)}, after_ddp=histories),
        "DVPO": compare(make(DVPO, gvm=gvm, use_task_reward=True, whiten_values=False), {"max_steps": 4}),
    }


def scenario_offline(policy: str, workdir: str, oreo_policy: str | None = None) -> dict:
    from lit_reason.callbacks import EvalAccuracy, ExportPolicy
    from lit_reason.methods import OREO, SFT
    from lit_reason.models.value import ValueModel

    def sft():
        return SFT(policy=policy, task=TASK, batch_size=4, warmup_steps=1, lr=1e-3)

    export = {}

    def oreo_kwargs():
        export["eval"] = EvalAccuracy(limit=8, max_new_tokens=64)
        export["export"] = ExportPolicy(dirpath=f"{workdir}/export/policy", value_dirpath=f"{workdir}/export/value")
        return {"max_steps": 4, "callbacks": list(export.values())}

    def oreo():
        # the default task: its validation prompts are those `evaluate --task arithmetic` reads
        return OREO(policy=oreo_policy or policy, task={"name": "arithmetic"}, data=f"{workdir}/data", batch_size=4, lr=1e-4,
                    selection="all", collect={"samples": 2, "limit": 8, "temperature": 1.0}, max_new_tokens=64,
                    progress=False)

    def exported(module, trainer):
        """The exported value model, reloaded on one process, against the sharded one."""
        out = {"eval": export["eval"].history}
        seqs = [[5, 6, 7, 8, 9], [10, 11, 12]]
        with module.rollout_phase():
            live = module.value_model.values_of(seqs, module.tokenizer.pad_token_id).tolist()
        if trainer.is_global_zero:
            loaded = ValueModel.load(f"{workdir}/export/value")
            out["value_live"], out["value_loaded"] = live, loaded.values_of(seqs, module.tokenizer.pad_token_id).tolist()
        return out

    return {"SFT": compare(sft, {"max_steps": 3, "gradient_clip_val": 1.0, "limit_val_batches": 0}),
            "OREO": compare(oreo, oreo_kwargs, after_fsdp=exported, after_ddp=lambda m, t: {"eval": export["eval"].history})}


def scenario_resume(policy: str, workdir: str, phases: str, out: str) -> dict:
    """Runs the ``+``-separated phases (:func:`sft_resume_phase`, ``o...``: :func:`online_resume_phase`)
    in this process. Results so far go to ``OUT.partial.rank{r}.json`` before each phase, since a
    ``kill`` phase ends the process."""
    results: dict = {}
    for phase in phases.split("+"):
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("LOCAL_RANK", 0))
        if results:
            Path(f"{out}.partial.rank{rank}.json").write_text(json.dumps(results))
        run = online_resume_phase if phase.startswith("o") else sft_resume_phase
        results[phase] = run(policy, workdir, phase)
    return results


def sft_resume_phase(policy: str, workdir: str, phase: str) -> dict:
    """SFT under FSDP, 2 epochs of 4 batches per rank, a checkpoint at every epoch end.

    ``full``: uninterrupted (records the parameters after epoch 1 too); ``kill``: the processes die
    (``os._exit``, no teardown) at the start of epoch 2, after epoch 1's checkpoint; ``resume``:
    continues that run from the checkpoint; ``resume1``: loads it on ONE process (another world
    size) with ``max_epochs=1``, i.e. only restores it.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lit_reason.methods import SFT

    after_epoch0 = {}

    class Kill(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 0:
                sys.stdout.flush()
                os._exit(17)  # no teardown, no final checkpoint: as a killed job

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                after_epoch0.update(full_params(pl_module.policy))

    root = f"{workdir}/{'full' if phase == 'full' else 'killed'}"
    module = SFT(policy=policy, task={**TASK, "n_train": 32}, batch_size=4, warmup_steps=1, lr=1e-3)
    ckpt = ModelCheckpoint(dirpath=f"{root}/checkpoints", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    devices = 1 if phase == "resume1" else 2
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    logger = CSVLogger(root, name="csv", version=0, flush_logs_every_n_steps=1) if phase != "resume1" else False
    callbacks = [ckpt, *([Kill()] if phase == "kill" else []), *([Record()] if phase == "full" else [])]
    trainer = make_trainer(strategy, devices=devices, max_epochs=1 if phase == "resume1" else 2, limit_val_batches=0,
                           enable_checkpointing=phase != "resume1", logger=logger, default_root_dir=root,
                           callbacks=callbacks if phase != "resume1" else [], log_every_n_steps=1)
    pl.seed_everything(0)
    resume = phase in ("resume", "resume1")
    trainer.fit(module, ckpt_path=f"{root}/checkpoints/epoch=0-step=4.ckpt" if resume else None)
    params = full_params(module.policy)
    return {"params": {k: v.flatten().tolist() for k, v in params.items()},
            "after_epoch0": {k: v.flatten().tolist() for k, v in after_epoch0.items()},
            "step": trainer.global_step, "world": trainer.world_size}


def online_resume_phase(policy: str, workdir: str, phase: str) -> dict:
    """VinePPO under FSDP with ``ResumeState`` (the RNG / sampler state of an exact resume): 2
    iterations of 2 optimiser steps, a checkpoint every 2 steps; phases as :func:`sft_resume_phase`
    (``ofull``, ``okill``, ``oresume``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lit_reason.callbacks.resume import ResumeState
    from lit_reason.methods import VinePPO

    class Kill(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                sys.stdout.flush()
                os._exit(17)

    root = f"{workdir}/{'ofull' if phase == 'ofull' else 'okilled'}"
    module = with_eos_bias(VinePPO(policy=policy, mc_rollouts=2, **ONLINE))
    ckpt = ModelCheckpoint(dirpath=f"{root}/checkpoints", save_top_k=-1, every_n_train_steps=2)
    trainer = make_trainer(fsdp_strategy(), max_steps=4, limit_val_batches=0, enable_checkpointing=True,
                           logger=CSVLogger(root, name="csv", version=0, flush_logs_every_n_steps=1),
                           default_root_dir=root, log_every_n_steps=1,
                           callbacks=[ckpt, ResumeState(), *([Kill()] if phase == "okill" else [])])
    pl.seed_everything(0)
    trainer.fit(module, ckpt_path=f"{root}/checkpoints/epoch=0-step=2.ckpt" if phase == "oresume" else None)
    return {"params": {k: v.flatten().tolist() for k, v in full_params(module.policy).items()},
            "step": trainer.global_step}


def scenario_smoke(policy: str, workdir: str, trained: str) -> dict:
    """The methods not compared with DDP above, briefly under FSDP: GRPO (tiny policy); RFT, DPO,
    DQO and DVPO stage 1 on one shared dataset of the SFT'd policy ``trained``; and a LoRA SFT whose
    merged export must load. Records, per method, whether every model was sharded, the step reached
    and the largest change of any trainable parameter (it trained)."""
    from lit_reason.callbacks import ExportPolicy, MCTSTargetRefresh
    from lit_reason.methods import DPO, DQO, DVO, DVPOGVM, GRPO, RFT, SFT

    offline = dict(policy=trained, task={"name": "arithmetic"}, data=f"{workdir}/data", batch_size=4,
                   collect={"samples": 4, "limit": 8, "temperature": 1.0}, max_new_tokens=64, progress=False)
    lora = {"r": 2, "lora_alpha": 4, "target_modules": "all-linear"}
    runs = {
        "GRPO": (lambda: with_eos_bias(GRPO(policy=policy, **ONLINE)), []),
        "RFT": (lambda: RFT(lr=1e-4, **offline), []),
        "DPO": (lambda: DPO(lr=1e-4, **offline), []),
        "DQO": (lambda: DQO(lr=1e-4, **offline), []),
        "DVPOGVM": (lambda: DVPOGVM(lr=1e-4, **offline), []),
        "SFT-LoRA": (lambda: SFT(policy=policy, task=TASK, batch_size=4, lr=1e-2, lora=lora),
                     [ExportPolicy(dirpath=f"{workdir}/lora_export")]),
        # DVO: MCTS targets built in setup, then re-searched by rank 0 alone with the sharded policy
        # (gathered on both ranks) after epoch 1
        "DVO": (lambda: DVO(policy=trained, task={"name": "arithmetic"}, data=f"{workdir}/dvo", batch_size=4,
                            lr=1e-4, max_new_tokens=64, progress=False,
                            targets={"limit": 4, "simulations": 4, "width": 2, "max_depth": 3, "chunk_size": 2}),
                [MCTSTargetRefresh(every_n_epochs=1, simulations=4)]),
    }
    out = {}
    for name, (make, callbacks) in runs.items():
        pl.seed_everything(0)
        module = make()
        before = {k: full_params(m) for k, m in module.trainable_models().items()}
        length = {"max_epochs": 2, "reload_dataloaders_every_n_epochs": 1} if name == "DVO" else {"max_steps": 2}
        trainer = make_trainer(fsdp_strategy(), limit_val_batches=0, callbacks=callbacks,
                               default_root_dir=f"{workdir}/{name}", **length)
        trainer.fit(module)
        after = {k: full_params(m) for k, m in module.trainable_models().items()}
        changed = max(max_diff(before[k], after[k]) for k in before)
        out[name] = {"sharded": all(is_sharded(m) for m in [*module.trainable_models().values(),
                                                            *module.frozen_models().values()]),
                     "models": sorted(module.trainable_models()), "frozen": sorted(module.frozen_models()),
                     "step": trainer.global_step, "changed": changed,
                     "refreshes": callbacks[0].refreshes if name == "DVO" else None}
    if dist.get_rank() == 0:  # the merged LoRA export loads as a plain causal LM
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(f"{workdir}/lora_export")
        out["lora_export_params"] = sum(p.numel() for p in plain.parameters())
        out["lora_adapter_saved"] = (Path(workdir) / "lora_export" / "adapter" / "adapter_config.json").is_file()
    out["bad"] = scenario_bad(policy)  # in the same processes: a failed fit leaves the group usable
    return out


def scenario_bad(policy: str) -> dict:
    """Bad settings fail at fit start with one message: tensor parallelism asked for, and a policy
    whose decoder layers FSDP cannot find (the real tiny model with its ``_no_split_modules`` cleared)."""
    from lit_reason.methods import SFT

    def attempt(strategy, break_layers=False):
        module = SFT(policy=policy, task=TASK, batch_size=4)
        if break_layers:
            for m in module.policy.modules():
                if hasattr(m, "_no_split_modules"):
                    m._no_split_modules = None
        try:
            make_trainer(strategy, max_steps=1, limit_val_batches=0).fit(module)
        except ValueError as err:
            return str(err)
        return None

    return {"tensor_parallel": attempt(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)),
            "no_layers": attempt(fsdp_strategy(), break_layers=True)}


def main() -> None:
    torch.set_num_threads(1)
    scenario, out, policy = sys.argv[1:4]
    extra = sys.argv[4:]
    os.chdir(Path(out).parent)  # whatever a run writes by default (run folders, diagrams) stays in the test's tmp folder
    result = {"online": lambda: scenario_online(policy, *extra), "offline": lambda: scenario_offline(policy, *extra),
              "resume": lambda: scenario_resume(policy, *extra, out), "bad": lambda: scenario_bad(policy),
              "smoke": lambda: scenario_smoke(policy, *extra)}[scenario]()
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("LOCAL_RANK", 0))
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"rank": rank, **result}))


if __name__ == "__main__":
    main()
