"""DVPO stage 2: PPO-clip with advantages from a frozen global value model (arXiv 2502.16944; docs/dvpo.md).

No reward model and no online critic: the GVM pretrained by stage 1
(:class:`~lit_reason.methods.dvpo_gvm.DVPOGVM`) is loaded and frozen, and every iteration

    V_t  = GVM(s_t), s_t = (x, y_<t), t < m;  R^ = V(s_{m-1})    # frozen, no grad (see below)
    gae (default, the code):  r_t = -kl_reward_coef * (logp_old - logp_ref)_t  [+ R at the end]
                              A   = whiten(GAE_{gamma, lam}(r, whiten(V)) with R^ bootstrapping the end)
    static (the paper):       A_t = whiten(Q(s_t, a_t)),  Q(s_t, a_t) = V(s_{t+1})  (R^ for the last token)

then PPO-clip epochs (:class:`~lit_reason.methods.online.OnlineRL`).

Choices (beyond the sources; reasons in docs/dvpo.md):
    * **The end of a response.** Stage 1 trains states s_0 .. s_{m-1}; the target of s_{m-1} is
      exactly the outcome, so ``R^ = V(s_{m-1})`` is the GVM's estimate of the reward. GAE needs a
      value after the last token: the source's KL-only reward with V = 0 after the end would give the
      last token ``-V(s_{m-1})`` (punishing responses the GVM likes), so R^ is the terminal reward
      instead (the official trl-based code bootstraps from the value one position past the end,
      the same idea). With ``gamma = lam = 1`` this is ``A_t = R^ - V(s_t)`` plus the KL terms.
    * **Static advantage** reads the GVM *after* token t (Q of the action taken): the value before
      it, V(s_t), does not depend on a_t, so its policy gradient is zero in expectation.
    * ``use_task_reward`` adds the verifier's outcome (+-1, docs/index.md, rewards) to the terminal
      reward of ``gae`` (on top of R^); ``static`` has no reward and refuses it.
    * beta_kl is fixed (``kl_reward_coef``): the source's adaptive controller (horizon 10000) would
      move it by < 0.3% per iteration at these batch sizes. The k3 KL in the loss (``kl_coef``) is
      OnlineRL's and is usually 0 here (the KL lives in the reward).
    * Values are whitened over the valid tokens of the global batch (``whiten_values``), as
      :func:`~lit_reason.losses.dvpo.dvpo_advantages` documents.

The frozen GVM is a registered submodule (it follows ``.to(device)`` and the strategy's device
placement) but: ``requires_grad`` is off, it stays in eval mode whatever ``train()`` is called with,
it is not in the optimiser, and it is **not** in ``state_dict``: checkpoints hold the GVM folder's
path and fingerprint (the GVM is saved once, as its folder; no copy per checkpoint), and a reload
re-reads that folder and refuses one whose fingerprint changed.

``gvm: null`` builds stage 1 on first use, in :meth:`DVPO.setup` (:func:`ensure_gvm`; never in the
constructor): ``recipes/dvpo_gvm.yaml`` runs in a subprocess with this module's policy and task,
into a cache folder keyed by those settings (:func:`lit_reason.io.build_once`: file lock, build in
a temporary folder, atomic rename), so one command runs DVPO on a fresh machine and later runs
(any seed) reuse the same GVM.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from lit_reason.io import build_once
from lit_reason.losses.common import masked_whiten
from lit_reason.losses.dvpo import DVPO_ADVANTAGE_MODES, dvpo_advantages
from lit_reason.methods.dvpo_gvm import gvm_response_values, signed_outcomes
from lit_reason.methods.online import OnlineRL
from lit_reason.models.policy import freeze
from lit_reason.models.value import VALUE_HEAD_CONFIG, VALUE_HEAD_WEIGHTS, ValueModel
from lit_reason.rollout.batch import TrajectoryBatch

__all__ = ["DVPO", "ensure_gvm", "gvm_cache_path", "load_gvm", "gvm_fingerprint"]

GVM_BUILD_VERSION = "v1"  # bump when stage 1 changes, so cached GVMs are not reused
_CKPT_KEY = "lit_reason_dvpo"


# ---- the GVM folder -----------------------------------------------------------------------------
def gvm_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a GVM folder: sha256 of its head, configs and weight-file sizes."""
    path = Path(path)
    h = hashlib.sha256()
    for name in (VALUE_HEAD_WEIGHTS, VALUE_HEAD_CONFIG, "config.json"):
        f = path / name
        h.update(name.encode() + (f.read_bytes() if f.is_file() else b"<missing>"))
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def load_gvm(path: str | os.PathLike, tokenizer, dtype: str | None = None) -> ValueModel:
    """Loads a GVM folder frozen (no grad, eval) after checking it reads the policy's tokens.

    Raises:
        ValueError: The GVM was saved with another tokenizer (vocabulary fingerprint), or, with no
            tokenizer saved, its trunk's vocabulary size differs from the tokenizer's.
    """
    from transformers import AutoTokenizer

    from lit_reason.data.trajectories import tokenizer_fingerprint

    path = Path(path).expanduser()
    gvm = ValueModel.load(path, dtype=dtype)
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        theirs = AutoTokenizer.from_pretrained(str(path))
        if tokenizer_fingerprint(theirs) != tokenizer_fingerprint(tokenizer):
            raise ValueError(f"GVM {path} was trained with another tokenizer than the policy's (vocabulary or EOS "
                             "differ): a value model must read the policy's token ids; train stage 1 "
                             "(recipes/dvpo_gvm.yaml) from this policy")
    else:
        vocab = getattr(gvm.trunk.config, "vocab_size", None)
        if vocab is not None and vocab < len(tokenizer):
            raise ValueError(f"GVM {path}: trunk vocabulary {vocab} < the policy tokenizer's {len(tokenizer)}, and "
                             "the folder holds no tokenizer to compare: train stage 1 from this policy")
    return freeze(gvm)


def _task_key(task: Any) -> Any:
    from lit_reason.methods.common import resolve_task

    if isinstance(task, (str, dict)):
        return task
    return repr(resolve_task(task))


def gvm_cache_path(policy: str, task: Any, recipe: str | os.PathLike, overrides: list[str] | None = None) -> Path:
    """Cache folder of the GVM that stage 1 (``recipe`` + overrides) builds for ``policy``/``task``."""
    from lit_reason.models.embedded import EMBEDDED_VERSION, cache_dir

    recipe = Path(recipe)
    payload = {"version": GVM_BUILD_VERSION, "recipe": recipe.read_text(), "policy": policy, "task": _task_key(task),
               "overrides": list(overrides or []),
               "embedded": EMBEDDED_VERSION if str(policy).startswith("embedded:") else None}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / f"dvpo-gvm-{key}"


def resolve_recipe(recipe: str | os.PathLike) -> Path:
    """A recipe path as given, else under the repository's ``recipes/``."""
    from lit_reason.models.embedded import recipes_dir

    p = Path(recipe).expanduser()
    if p.is_file():
        return p
    q = recipes_dir() / recipe
    if q.is_file():
        return q
    raise FileNotFoundError(f"DVPO: stage-1 recipe {recipe} not found (nor {q})")


def ensure_gvm(policy: str, task: Any, recipe: str | os.PathLike = "dvpo_gvm.yaml",
               overrides: list[str] | None = None) -> Path:
    """The GVM folder for ``policy`` on ``task``, training stage 1 with ``recipe`` on first use.

    The recipe runs through the CLI in a subprocess (``--model.init_args.policy/task`` set to the
    caller's, its data collected into ``<cache>.data``, extra ``overrides`` appended); it must
    export the GVM to ``${trainer.default_root_dir}/gvm`` (``ExportPolicy(value_dirpath=...)``).
    The export is renamed into the cache folder, under a file lock, so concurrent first uses (DDP
    ranks, parallel runs) train it once and never see a half-written folder.
    """
    recipe = resolve_recipe(recipe)
    target = gvm_cache_path(policy, task, recipe, overrides)

    def build(work: Path) -> Path:
        cmd = [sys.executable, "-m", "lit_reason", "fit", "--config", str(recipe),
               "--trainer.default_root_dir", str(work / "run"),
               "--model.init_args.policy", str(policy),
               "--model.init_args.task", json.dumps(task) if isinstance(task, (dict, str)) else str(task),
               "--model.init_args.data", str(target.with_name(target.name + ".data")),
               "--trainer.enable_progress_bar", "false", *(overrides or [])]
        print(f"[lit_reason] DVPO: training the GVM (stage 1) with {recipe} on first use; cached in {target}",
              file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=work)  # every path is absolute: any working directory will do
        export = work / "run" / "gvm"
        if proc.returncode != 0 or not _is_gvm_folder(export):
            raise RuntimeError(f"DVPO stage 1 failed (exit {proc.returncode}, export {export} "
                               f"{'present' if export.exists() else 'missing'}): {' '.join(cmd)}")
        return export

    return build_once(target, _is_gvm_folder, build)


def _is_gvm_folder(path: Path) -> bool:
    return (path / VALUE_HEAD_CONFIG).is_file()


# ---- stage 2 ------------------------------------------------------------------------------------
class DVPO(OnlineRL):
    """PPO-clip with advantages from a frozen GVM. Other arguments: :class:`OnlineRL`.

    Args:
        gvm: GVM folder (written by ``ExportPolicy(value_dirpath=...)`` after stage 1); None
            builds it on first use with ``gvm_recipe`` (cached, see :func:`ensure_gvm`).
        gvm_recipe: Stage-1 recipe for ``gvm: null`` (a path, or a name under ``recipes/``).
        gvm_overrides: Extra CLI arguments of that stage-1 run (part of the cache key).
        advantage: ``gae`` (the code; default) or ``static`` (the paper).
        kl_reward_coef: beta_kl of the per-token KL reward (``gae``; source: adaptive, init 0.2).
        gamma: GAE discount (source: 1.0).
        lam: GAE lambda (source: 0.95).
        use_task_reward: Add the verifier's +-1 outcome at the last token (``gae`` only).
        whiten_values: Whiten the GVM values over the batch's valid tokens (the code: yes).
    """

    def __init__(self, gvm: str | None = None, gvm_recipe: str = "dvpo_gvm.yaml",
                 gvm_overrides: list[str] | None = None, advantage: str = "gae", kl_reward_coef: float = 0.2,
                 gamma: float = 1.0, lam: float = 0.95, use_task_reward: bool = False, whiten_values: bool = True,
                 **kwargs) -> None:
        if advantage not in DVPO_ADVANTAGE_MODES:
            raise ValueError(f"advantage must be one of {DVPO_ADVANTAGE_MODES}, got {advantage!r}")
        if use_task_reward and advantage == "static":
            raise ValueError("use_task_reward needs advantage='gae': the static advantage has no reward")
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["task"])
        self._gvm_task = kwargs.get("task", "arithmetic")  # RLModule's default; `task` is not a hyper-parameter
        self.gvm = None
        self.value_range = (-1.0, 1.0)  # value-calibration protocol: the GVM predicts +-1 outcomes
        # frozen and saved once (as its folder): keep it out of every checkpoint's state_dict
        self.register_state_dict_post_hook(_drop_gvm_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_gvm_keys)
        if gvm:  # loading a finished GVM is cheap; building one (gvm: null) waits for setup()
            self.attach_gvm(Path(gvm).expanduser())

    def setup(self, stage: str) -> None:
        """Builds stage 1 on first use (``gvm: null``): nothing trains inside the constructor."""
        super().setup(stage)
        if self.gvm is None:
            hp = self.hparams
            self.attach_gvm(ensure_gvm(hp.policy, self._gvm_task, hp.gvm_recipe, hp.gvm_overrides))

    def attach_gvm(self, path: Path) -> None:
        """Loads the GVM folder ``path`` frozen and records it for checkpoints."""
        # the resolved folder goes into the saved hyper-parameters, so a checkpoint reloads this GVM
        # (never a rebuild, whatever the cache key would be at reload time)
        self.hparams["gvm"] = str(path)
        self.gvm = load_gvm(path, self.tokenizer, dtype=self.hparams.dtype)
        self.gvm_path = str(path)
        self.gvm_fingerprint = gvm_fingerprint(path)

    @property
    def value_model(self) -> ValueModel | None:
        """The GVM (``ExportPolicy(value_dirpath=...)`` exports it); None until :meth:`setup` builds it."""
        return self.gvm

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        frozen = super().frozen_models()
        return {**frozen, "gvm": self.gvm} if self.gvm is not None else frozen

    def train(self, mode: bool = True):
        super().train(mode)
        if self.gvm is not None:
            self.gvm.eval()  # frozen: no dropout, whatever Lightning switches
        return self

    # ---- advantages -------------------------------------------------------------------------
    @torch.no_grad()
    def gvm_values(self, traj: TrajectoryBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V [B, L], R^ [B])`` of a rollout batch (:func:`gvm_response_values`), in minibatches."""
        out = [gvm_response_values(self.gvm, traj.select(i))
               for i in torch.arange(len(traj)).split(self.hparams.minibatch_size)]
        return torch.cat([v for v, _ in out]), torch.cat([f for _, f in out])

    def compute_advantages(self, traj: TrajectoryBatch) -> torch.Tensor:
        hp = self.hparams
        mask = traj.response_mask
        values, final = self.gvm_values(traj)
        traj.extras["old_values"] = values
        last = (mask.sum(-1).long() - 1).clamp(min=0).unsqueeze(1)  # [B, 1]
        v = masked_whiten(values, mask) if hp.whiten_values else values
        if self._trainer is not None and self.trainer.training:
            self.log_dict({"train/gvm_value_mean": (values.sum() / mask.sum().clamp(min=1)),
                           "train/gvm_outcome_mean": final.mean(),
                           "train/gvm_outcome_mae": (final - signed_outcomes(traj.rewards)).abs().mean()})
        if hp.advantage == "static":
            # Q(s_t, a_t) = V(s_{t+1}); the last token's is the outcome estimate V(s_{m-1})
            q = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1)
            q = q.scatter(1, last, v.gather(1, last)) * mask
            return dvpo_advantages(q, traj.old_logprobs, traj.ref_logprobs, mask, mode="static", whiten=False)
        terminal = v.gather(1, last).squeeze(1)  # R^, on the (whitened) value scale
        if hp.use_task_reward:
            terminal = terminal + signed_outcomes(traj.rewards).to(terminal)
        adv = dvpo_advantages(v, traj.old_logprobs, traj.ref_logprobs, mask, mode="gae", kl_coef=hp.kl_reward_coef,
                              gamma=hp.gamma, lam=hp.lam, task_rewards=terminal, whiten=False)
        return masked_whiten(adv, mask) if hp.whiten_advantages else adv

    # ---- checkpoints: the GVM by reference ----------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[_CKPT_KEY] = {"gvm_path": self.gvm_path, "gvm_fingerprint": self.gvm_fingerprint}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(_CKPT_KEY) or {}
        want = state.get("gvm_fingerprint")
        if want and want != self.gvm_fingerprint:
            raise ValueError(f"DVPO checkpoint was trained with the GVM {state.get('gvm_path')} (fingerprint "
                             f"{want[:12]}), but this module loaded {self.gvm_path} ({self.gvm_fingerprint[:12]}): "
                             "pass `gvm: <the original folder>`")

    # ---- value-calibration protocol ---------------------------------------------------------
    @torch.no_grad()
    def state_values(self, prompt_ids, partial_ids, examples) -> torch.Tensor:
        """[N] frozen GVM value V(S) of each state S = prompt ++ partial response (scale +-1)."""
        seqs = [list(p) + list(q) for p, q in zip(prompt_ids, partial_ids)]
        # a terminal state (ending with EOS) is read before its EOS, where the GVM is trained
        return self.gvm.values_of(seqs, self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id).cpu()


def _drop_gvm_keys(module, state_dict, prefix, local_metadata) -> None:
    for k in [k for k in state_dict if k.startswith(prefix + "gvm.")]:
        del state_dict[k]


def _ignore_missing_gvm_keys(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith("gvm.")]
