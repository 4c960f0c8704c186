"""A value model on the policy's own frozen trunk, trained through a second LoRA adapter.

With a LoRA policy, a value model does not need its own copy of the base weights: a second adapter
(``value``) is added to the policy's ``PeftModel`` and the value model reads the policy's inner
transformer body with that adapter active. One copy of the base weights sits in memory; the policy
trains its adapter, the value model its adapter and its head.

Which adapter a forward uses is global state of the shared layers. The policy's adapter is active
at rest, so every policy forward (training, sampling, evaluation, export) sees the policy exactly as
without a value adapter; a value forward switches to the ``value`` adapter inside
:func:`active_adapter` and back. The reference is the base with every adapter disabled
(:class:`~lit_reason.models.policy.Reference`), unchanged.

peft's ``set_adapter`` (and the exit of ``disable_adapter``) sets ``requires_grad=False`` on every
inactive adapter. A leaf whose ``requires_grad`` is off when ``backward`` runs gets no gradient,
so after each switch both adapters are made trainable again, and the optimisers take their
parameters by adapter (:func:`adapter_parameters`), never by ``requires_grad``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from operator import attrgetter
from typing import Any

from torch import nn

VALUE_ADAPTER = "value"
UNSUPPORTED_LORA_KEYS = ("modules_to_save", "trainable_token_indices")  # extra trained copies of whole modules


def check_share_trunk(share_trunk: bool, lora: dict | None, value_lora: dict | None = None,
                      value_key: str = "critic_lora") -> None:
    """Fails early (before any model is loaded) when ``share_trunk`` cannot work.

    Args:
        share_trunk: The method's argument.
        lora: The policy's LoRA arguments.
        value_lora: The value adapter's own LoRA arguments, if the method has them.
        value_key: Their argument name, for the message.

    Raises:
        ValueError: ``share_trunk`` without ``lora`` on the policy, or with a LoRA option that trains
            whole modules (``modules_to_save``, ``trainable_token_indices``): the other adapter
            would have no copy of that module to switch to.
    """
    if not share_trunk:
        return
    if not lora:
        raise ValueError("share_trunk: true needs a LoRA policy: set `lora` (e.g. {r: 8, lora_alpha: 16, "
                         "target_modules: all-linear}) or share_trunk: false")
    for key, cfg in (("lora", lora), (value_key, value_lora or {})):
        bad = [k for k in UNSUPPORTED_LORA_KEYS if cfg.get(k)]
        if bad:
            raise ValueError(f"share_trunk: true does not support {key}.{bad[0]} (a whole module per adapter); "
                             "drop it or set share_trunk: false")


def check_not_sharded(module) -> None:
    """Refuses FSDP (``ModelParallelStrategy``) for a module whose value model shares the policy's trunk.

    FSDP shards each declared model on its own; the shared layers would be sharded twice.

    Raises:
        ValueError: naming ``share_trunk``.
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = getattr(module, "_trainer", None)
    if trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy):
        raise ValueError("share_trunk: true is not supported under FSDP (ModelParallelStrategy): the shared trunk "
                         "would be sharded twice; use share_trunk: false or strategy: ddp")


def add_value_adapter(policy, lora: dict[str, Any], name: str = VALUE_ADAPTER) -> None:
    """Adds a trainable LoRA adapter ``name`` to the policy's ``PeftModel``; the policy's adapter stays active.

    Args:
        policy: A ``peft.PeftModel`` (:func:`~lit_reason.models.policy.build_policy` with ``lora``).
        lora: ``peft.LoraConfig`` arguments of the new adapter.
        name: Adapter name (must be new).
    """
    from peft import LoraConfig

    cfg = dict(lora)
    cfg.setdefault("task_type", "CAUSAL_LM")
    policy.add_adapter(name, LoraConfig(**cfg))  # not activated by peft: the policy's adapter stays on
    for p in adapter_parameters(policy, name):
        p.requires_grad_(True)  # peft adds it frozen (inactive)


def _adapter_modules(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    for module in model.modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            yield module


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` in every adapter layer of ``model`` (in module order, no repeats)."""
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in _adapter_modules(model):
        for layer_name in module.adapter_layer_names:
            holder = attrgetter(layer_name)(module)
            if not isinstance(holder, (nn.ModuleDict, nn.ParameterDict)) or name not in holder:
                continue
            item = holder[name]
            for p in ([item] if isinstance(item, nn.Parameter) else item.parameters()):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def _make_trainable(model: nn.Module, names: Sequence[str]) -> None:
    for name in names:
        for p in adapter_parameters(model, name):
            p.requires_grad_(True)


@contextmanager
def active_adapter(model, name: str, trainable: Sequence[str] = ()) -> Iterator[None]:
    """``model``'s layers run adapter ``name`` inside the block; the adapter active before is restored after.

    Switches the LoRA layers (the tuner's ``set_adapter``), not the ``PeftModel``'s own
    ``active_adapter``, which keeps naming the policy's adapter (``disable_adapter`` reads it).

    Args:
        model: A ``peft.PeftModel``.
        name: The adapter to run.
        trainable: Adapters whose parameters keep ``requires_grad=True`` across the switch (peft
            freezes inactive adapters; a gradient reaches a leaf only if it requires grad when
            ``backward`` runs, which is after the block).
    """
    tuner = model.base_model
    before = tuner.active_adapter
    if before == name or before == [name]:
        yield
        return
    tuner.set_adapter(name)
    _make_trainable(model, trainable)
    try:
        yield
    finally:
        tuner.set_adapter(before)
        _make_trainable(model, trainable)


class SharedTrunk:
    """The policy's ``PeftModel`` as a value model's trunk: which adapter is whose.

    Args:
        policy: The LoRA policy (``peft.PeftModel``), whose active adapter is the policy's.
        lora: LoRA arguments of the value adapter (added here).
        value_adapter: Its name.
    """

    def __init__(self, policy, lora: dict[str, Any], value_adapter: str = VALUE_ADAPTER) -> None:
        self.policy = policy
        self.policy_adapter = policy.active_adapter
        self.value_adapter = value_adapter
        if value_adapter == self.policy_adapter:
            raise ValueError(f"the value adapter needs a name other than the policy's ({value_adapter!r})")
        add_value_adapter(policy, lora, value_adapter)

    @property
    def body(self) -> nn.Module:
        """The policy's transformer body (no LM head), LoRA layers of both adapters inside."""
        from lit_reason.models.value import lm_trunk

        return lm_trunk(self.policy.base_model.model)

    def value_forward(self):
        """Context of a value forward: the value adapter runs, both adapters stay trainable."""
        return active_adapter(self.policy, self.value_adapter, (self.policy_adapter, self.value_adapter))

    def policy_parameters(self) -> list[nn.Parameter]:
        """The policy adapter's parameters (what the policy's optimiser gets)."""
        return adapter_parameters(self.policy, self.policy_adapter)

    def value_parameters(self) -> list[nn.Parameter]:
        """The value adapter's parameters (the critic's optimiser gets them, with the head)."""
        return adapter_parameters(self.policy, self.value_adapter)

    def merged_value_body(self) -> nn.Module:
        """A copy of the transformer body with the value adapter (only) merged into the base weights."""
        from lit_reason.models.value import lm_trunk

        merged = copy.deepcopy(self.policy).merge_and_unload(adapter_names=[self.value_adapter])
        return lm_trunk(merged)
