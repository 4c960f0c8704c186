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
"""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
from torch import nn

from lit_reason.parallel.fsdp import fsdp_mesh, gathered, is_sharded, mixed_precision_policy, shard_frozen, shard_model


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
