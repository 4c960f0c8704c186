"""The base of every method module: which models it holds, and sharding them under FSDP2.

:class:`ReasoningModule` is deliberately small. A method declares its models, trainable
(:meth:`~ReasoningModule.trainable_models`: policy, critic, value model) and frozen
(:meth:`~ReasoningModule.frozen_models`: the reference copy, DVPO's GVM); the base then

* shards all of them in ``configure_model`` when the Trainer runs Lightning's
  ``ModelParallelStrategy`` (FSDP2: each decoder layer and the root, over the data-parallel mesh,
  :mod:`lit_reason.parallel.fsdp`), and does nothing under any other strategy;
* gives rollout phases one context, :meth:`~ReasoningModule.rollout_phase`, which gathers the
  sharded models' parameters once for the phase (a no-op when nothing is sharded).

``configure_model`` runs after ``setup`` (so models attached there, e.g. DVPO's GVM built on
first use, are sharded too) and before the optimisers are built from the sharded parameters.

It also holds the optimisation every method shares: :meth:`~ReasoningModule.adamw` (AdamW, betas
(0.9, 0.95), the module's ``weight_decay``) and :meth:`~ReasoningModule.manual_step`, the one
manual step (zero_grad, backward, gradient clip, step, scheduler step) of the methods that take
several optimiser steps per batch (online PPO epochs, DVPO stage 1, OREO's critic-then-policy).

One name per concept across methods (old names fail at parse time, README "Names"):

* ``eval_limit``: prompts (examples, for SFT) of the ``validate``/``test`` loops;
* ``warmup_steps``: LR warmup in optimiser steps, every method (offline methods default to 3% of
  the run, whose length is often set in epochs and known only once the Trainer has the dataset);
* ``kl_coef``: weight of a KL penalty to the reference in the *loss*; ``kl_reward_coef``: weight
  of a per-token KL penalty in the *reward* (DVPO, which can have both);
* ``beta``: not a KL penalty weight but the temperature of an implicit reward
  ``beta * log pi/pi_ref`` (DPO, OREO, DQO, DVO), as in their papers;
* ``val/accuracy`` / ``test/accuracy``: greedy accuracy on the validation / test split, whether
  the ``validate``/``test`` loops or :class:`~lit_reason.callbacks.EvalAccuracy` (during ``fit``,
  against optimiser steps) measured it; ``time/train_seconds`` is the training time at each
  ``EvalAccuracy`` evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lit_reason.methods.common import GreedyAccuracyLoops, resolve_task
from lit_reason.models.policy import Reference, build_policy
from lit_reason.parallel.fsdp import fsdp_mesh, gathered, is_sharded, mixed_precision_policy, shard_frozen, shard_model
from lit_reason.steps import StepSplitter


class ReasoningModule(pl.LightningModule):
    """A LightningModule holding a policy (and maybe critics, a reference, a frozen value model).

    Subclasses extend :meth:`trainable_models` / :meth:`frozen_models` (call ``super()`` and add
    their own entries). Models that share parameters with another entry (a LoRA reference is the
    policy with its adapter off) are listed once.
    """

    def trainable_models(self) -> dict[str, nn.Module]:
        """Models with parameters in an optimiser, by name (default: ``policy``)."""
        policy = getattr(self, "policy", None)
        return {"policy": policy} if policy is not None else {}

    def frozen_models(self) -> dict[str, nn.Module]:
        """Models that are read but never trained, by name (default: the reference's own copy)."""
        ref = getattr(self, "reference", None)
        if ref is None or getattr(ref, "shares_policy", False):
            return {}
        return {"reference": ref.model}

    def configure_model(self) -> None:
        """Shards every declared model with FSDP2 under ``ModelParallelStrategy``; else a no-op."""
        mesh = self.device_mesh
        if mesh is None:
            return
        dp_mesh = fsdp_mesh(mesh)
        precision = getattr(self.trainer, "precision", None) if self._trainer is not None else None
        mp_policy = mixed_precision_policy(precision, dp_mesh.device_type)
        for name, model in self.trainable_models().items():
            shard_model(model, dp_mesh, mp_policy, name=name)
        for name, model in self.frozen_models().items():
            shard_frozen(model, dp_mesh, mp_policy, name=name)

    @property
    def is_sharded(self) -> bool:
        """Whether ``configure_model`` sharded the policy (``ModelParallelStrategy``)."""
        return is_sharded(getattr(self, "policy", None))

    def rollout_phase(self, *models: nn.Module | None) -> contextlib.AbstractContextManager:
        """Context for a rollout phase: the given models (default: all declared ones) gathered once.

        See :func:`lit_reason.parallel.fsdp.gathered`: no gradients inside, every rank must enter
        together, a no-op when unsharded.
        """
        if not models:
            models = tuple(self.trainable_models().values()) + tuple(self.frozen_models().values())
        return gathered(*models)

    # ---- optimisation -----------------------------------------------------------------------
    def adamw(self, params, lr: float) -> torch.optim.AdamW:
        """AdamW (betas (0.9, 0.95), the module's ``weight_decay``) over ``params`` or param groups."""
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.hparams.weight_decay, betas=(0.9, 0.95))

    def manual_step(self, opt, loss: torch.Tensor, scheduler=None) -> None:
        """One manual optimiser step on ``loss``: zero_grad, backward, clip to ``grad_clip``, step, scheduler step.

        Not named ``optimizer_step``: that is Lightning's hook of automatic optimisation.

        Args:
            opt: A (Lightning-wrapped) optimiser from :meth:`optimizers`.
            loss: Scalar loss whose gradients reach ``opt``'s parameters.
            scheduler: Its LR scheduler, stepped once per optimiser step (None: none).
        """
        opt.zero_grad()
        self.manual_backward(loss)
        if self.hparams.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        if scheduler is not None:
            scheduler.step()


class RLModule(GreedyAccuracyLoops, ReasoningModule):
    """The shared base of the online (:class:`~lit_reason.methods.online.OnlineRL`) and offline
    (:class:`~lit_reason.methods.offline.OfflineRL`) RL loops: their common arguments and setup.

    It builds the task, the policy (optional LoRA), the frozen reference
    (:class:`~lit_reason.models.policy.Reference`) and the step splitter, and gives ``validate`` /
    ``test`` as greedy accuracy (``val/accuracy`` / ``test/accuracy``). Subclasses declare their own
    arguments (and ``lr``, whose default differs), pass the rest on with ``**kwargs``, and call
    ``self.save_hyperparameters(ignore=["task"])`` after ``super().__init__``.

    Args:
        policy: Start policy (``embedded:arithmetic`` = the SFT'd tiny model); also the frozen
            reference.
        task: Task instance, name, or ``{name: ..., **kwargs}``.
        lr: Policy learning rate (AdamW, betas (0.9, 0.95)).
        weight_decay: AdamW weight decay.
        grad_clip: Gradient-norm clip per optimiser step (None or 0: none).
        max_new_tokens: Response length limit of sampling and evaluation (a cut response earns 0).
        splitter: Step-splitting policy (``newline``, ``double_newline``, ``math``).
        merge_answer_line: Merge the task's final-answer line into the last step (VinePPO's
            GSM8K split keeps ``#### N`` with the last step).
        dtype: Parameter dtype (``bf16`` on GPUs).
        lora: LoRA arguments; the reference is then the base with the adapter disabled.
        gradient_checkpointing: Recompute the policy's activations in the backward pass instead of
            keeping them (real models: a SmolLM2 minibatch of 32 chat prompts holds several GB of
            activations on the CPU); same gradients, about a third more compute per update.
        rollout_batch_size: Sequences decoded together (rollouts, collection, evaluation).
        eval_limit: Prompts of the ``validate``/``test`` loops (greedy accuracy).
        seed: Seed of sampling, shuffling and item selection.
        progress: Progress bars for rollouts and collection.
    """

    def __init__(
        self,
        policy: str = "embedded:arithmetic",
        task: Any = "arithmetic",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        grad_clip: float | None = 1.0,
        max_new_tokens: int = 96,
        splitter: str = "newline",
        merge_answer_line: bool = True,
        dtype: str | None = None,
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
        rollout_batch_size: int = 256,
        eval_limit: int = 200,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["task"])
        self.task = resolve_task(task)
        self.policy, self.tokenizer = build_policy(policy, dtype=dtype, lora=lora,
                                                   gradient_checkpointing=gradient_checkpointing)
        self.task.use_tokenizer(self.tokenizer)  # chat prompts need the policy's chat template
        self.reference = Reference(self.policy)
        answer_prefix = getattr(self.task, "answer_prefix", None) if merge_answer_line else None
        self.splitter = StepSplitter(splitter, answer_prefix=answer_prefix or None)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Returns the batch as it is: RL batches are Python rows (examples, collected responses),
        whose tensors are built on the device by the method. Lightning's default walks every element
        of every row's token lists, about 5% of a DPO step on the embedded policy."""
        return batch


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device | str | None) -> Iterator[nn.Module]:
    """``model`` moved to ``device`` inside the block and back to where it was after (None: a no-op).

    For work done in ``setup`` (first-use data builds on rank 0), before the strategy places the
    module: the build runs on the training device, the strategy then finds the module as it left it.
    """
    if device is None:
        yield model
        return
    before = next(model.parameters()).device
    model.to(device)
    try:
        yield model
    finally:
        model.to(before)
