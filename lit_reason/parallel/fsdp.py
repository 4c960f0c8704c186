"""FSDP2 sharding of the models a method trains or reads, and the rollout-phase gather.

Every model is sharded the same way, the recipe of PyTorch's FSDP2 (``fully_shard``): one FSDP
unit per transformer decoder layer, then one for the root (embeddings, final norm, LM or value
head), all over the data-parallel mesh. A unit all-gathers its parameters right before its forward
(and again in backward) and frees them after, so a rank holds ``1 / world_size`` of every
parameter, gradient and optimiser state between uses.

Trainable models (policy, critic, value model) and frozen ones (the reference, DVPO's GVM, the
collecting policy of DVPO stage 1) are sharded alike; a frozen one simply has no gradient and no
optimiser state.

Rollouts decode token by token. With per-layer gathers that is one all-gather per layer per
decoded token, and every rank would have to run exactly as many forwards as the others (an
all-gather is a collective): a rank whose responses all hit EOS earlier would leave the others
waiting forever. :func:`gathered` therefore unshards every FSDP unit of the given models *once*
for a whole rollout phase (with reshard-after-forward suspended), so the phase's forwards are
purely local, and reshards at its end. Cost: the full parameters of those models on every rank
during the phase; one all-gather per unit per phase instead of one per unit per forward.

Shapes are those of the wrapped modules; nothing here changes a model's inputs or outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "decoder_layers",
    "fsdp_units",
    "fsdp_mesh",
    "full_state_dict",
    "gathered",
    "is_sharded",
    "local_numel",
    "mixed_precision_policy",
    "rollout_phase_of",
    "shard_frozen",
    "shard_model",
    "unsharded_copy",
]


def _fsdp_module_cls():
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def fsdp_units(model: nn.Module | None) -> list[nn.Module]:
    """The FSDP units inside ``model`` (itself included), in module order; [] when unsharded."""
    if model is None:
        return []
    cls = _fsdp_module_cls()
    return [m for m in model.modules() if isinstance(m, cls)]


def is_sharded(model: nn.Module | None) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or to one of its submodules."""
    return bool(fsdp_units(model))


def decoder_layers(model: nn.Module, name: str = "model") -> list[nn.Module]:
    """The transformer decoder layers of a Hugging Face model, the FSDP units below the root.

    Works for any ``PreTrainedModel`` (causal LM or bare trunk), a peft-wrapped one, and a
    :class:`~lit_reason.models.value.ValueModel`: the layer classes are those the model lists in
    ``_no_split_modules`` (what ``device_map`` also refuses to split). Outermost matches only.

    Args:
        model: The model to search.
        name: What the model is (``policy``, ``critic`` ...), for the error message.

    Raises:
        ValueError: naming ``name`` and the model class, when no decoder layer is found.
    """
    classes: set[str] = set()
    for m in model.modules():
        classes.update(getattr(m, "_no_split_modules", None) or [])
    layers: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside:
            continue
        if type(m).__name__ in classes:
            layers.append(m)
            inside.update(id(x) for x in m.modules())
    if not layers:
        listed = sorted(classes) or "none"
        raise ValueError(
            f"FSDP: cannot find the decoder layers of the {name} ({type(model).__name__}): lit_reason shards the "
            f"layer classes a Hugging Face model lists in `_no_split_modules` (listed: {listed}), and none is in "
            f"this model. Use a Hugging Face causal LM as `{name}`, or train this model with `trainer.strategy: ddp`."
        )
    return layers


def fsdp_mesh(device_mesh):
    """The 1-D data-parallel mesh to shard over, from Lightning's ``ModelParallelStrategy`` mesh.

    Raises:
        ValueError: ``tensor_parallel_size`` > 1 (lit_reason shards with FSDP only), naming both sizes.
    """
    names = device_mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"ModelParallelStrategy(tensor_parallel_size={device_mesh['tensor_parallel'].size()}): lit_reason "
            "shards with FSDP2 only; set `trainer.strategy.init_args.tensor_parallel_size: 1` and "
            "`data_parallel_size` to the world size (devices x num_nodes)"
        )
    return device_mesh["data_parallel"] if "data_parallel" in names else device_mesh


def mixed_precision_policy(precision: str | None, device_type: str):
    """FSDP2's ``MixedPrecisionPolicy`` for a Lightning ``trainer.precision``, or None (fp32).

    bf16 (``bf16-mixed`` or ``bf16-true``) on a GPU: parameters all-gathered and computed in bf16,
    gradients reduced in fp32. On the CPU, and for any other precision: None, i.e. fp32 everywhere.
    Losses and value statistics are accumulated in fp32 by the methods whatever this policy says
    (they cast log-probs and values with ``.float()``).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    precision = str(precision or "32-true")
    if device_type == "cpu":
        return None
    if precision.startswith("bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision.startswith("16"):
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return None


def shard_model(model: nn.Module, mesh, mp_policy=None, name: str = "model") -> nn.Module:
    """``fully_shard`` on every decoder layer of ``model``, then on ``model`` itself (the root).

    Every unit reshards after its forward, the root included (the frozen reference would otherwise
    keep its root parameters gathered between calls). Already sharded: returned unchanged, so a
    second ``configure_model`` (``fit`` then ``test``) is harmless.

    Args:
        model: A Hugging Face model (optionally peft-wrapped) or a ValueModel.
        mesh: 1-D data-parallel device mesh (:func:`fsdp_mesh`).
        mp_policy: ``MixedPrecisionPolicy`` or None (fp32).
        name: What the model is, for error messages.

    Returns:
        The same module, now an FSDP module.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if is_sharded(model):
        return model
    kwargs = {"mesh": mesh, "reshard_after_forward": True, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in decoder_layers(model, name):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def shard_frozen(model: nn.Module, mesh, mp_policy=None, name: str = "model") -> nn.Module:
    """Shards a frozen model (reference, GVM) like :func:`shard_model`, after freezing it.

    No parameter requires grad afterwards, so FSDP never reduces a gradient for it, and it holds no
    optimiser state; it is put in eval mode (no dropout).
    """
    model.requires_grad_(False)
    model.eval()
    return shard_model(model, mesh, mp_policy, name)


class _GatherState:
    """Per-unit nesting depth, so that nested :func:`gathered` calls gather and free once."""

    depth: dict[int, int] = {}


@contextlib.contextmanager
def gathered(*models: nn.Module | None) -> Iterator[None]:
    """Unshards every FSDP unit of ``models`` for a rollout phase, and reshards at its end.

    Inside, the models hold their full parameters on every rank and forwards run without any
    collective, so ranks may run different numbers of forwards (different numbers of decode steps,
    an empty evaluation shard, rank-0-only work). When something is gathered, gradients are off
    inside (rollouts differentiate nothing; a graph through gathered parameters would bypass FSDP's
    gradient reduction). A true no-op for unsharded models (single process, DDP), so call sites
    need no branch.

    Every rank must enter and leave the context together (entering is one all-gather per unit).
    Nested calls and repeated models are fine: a unit is gathered by the outermost context only.
    """
    units: list[nn.Module] = []
    seen: set[int] = set()
    for model in models:
        for unit in fsdp_units(model):
            if id(unit) not in seen:
                seen.add(id(unit))
                units.append(unit)
    if not units:
        yield
        return
    entered = [u for u in units if _GatherState.depth.get(id(u), 0) == 0]
    for u in units:
        _GatherState.depth[id(u)] = _GatherState.depth.get(id(u), 0) + 1
    try:
        for u in entered:
            u.set_reshard_after_forward(False, recurse=False)
        for u in entered:
            u.unshard()
        with torch.no_grad():
            yield
    finally:
        for u in units:
            _GatherState.depth[id(u)] -= 1
            if _GatherState.depth[id(u)] == 0:
                del _GatherState.depth[id(u)]
        for u in entered:
            u.reshard()
            u.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of ``model`` on CPU, for export.

    Sharded: every rank must call it (it all-gathers); rank 0 gets the full tensors, the other
    ranks an empty dict. Unsharded: ``model.state_dict()`` detached on CPU, on every rank.
    """
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A plain CPU model of ``model``'s architecture holding ``state_dict`` (from :func:`full_state_dict`).

    A sharded module cannot be deep-copied, merged (LoRA) or saved with ``save_pretrained``; its
    unsharded twin can. Handles a Hugging Face causal LM, a peft-wrapped one (the active adapter's
    config) and a :class:`~lit_reason.models.value.ValueModel` with a plain trunk.

    Raises:
        NotImplementedError: a ValueModel whose trunk carries a LoRA adapter (export it from a DDP run).
    """
    from transformers import AutoModel, AutoModelForCausalLM

    from lit_reason.models.policy import is_lora
    from lit_reason.models.value import ValueModel

    if isinstance(model, ValueModel):
        if getattr(model, "_peft_wrapper", None):
            raise NotImplementedError("exporting a LoRA value model trained under FSDP is not supported: train the "
                                      "value model without `critic_lora`/`gvm_lora`, or with `strategy: ddp`")
        twin = ValueModel(AutoModel.from_config(model.trunk.config), model.head.in_features,
                          bias=model.head.bias is not None)
    elif is_lora(model):
        from peft import get_peft_model

        adapter = model.active_adapter
        twin = get_peft_model(AutoModelForCausalLM.from_config(model.get_base_model().config),
                              model.peft_config[adapter], adapter_name=adapter)
    else:
        twin = AutoModelForCausalLM.from_config(model.config)
    dtype = next((v.dtype for v in state_dict.values() if v.is_floating_point()), torch.float32)
    twin.to(dtype)
    twin.load_state_dict(state_dict, strict=True)
    return twin.eval()


def local_numel(tensors) -> tuple[int, int]:
    """``(elements held by this rank, elements in all)`` of parameters or optimiser-state tensors.

    A sharded tensor (DTensor) counts its local shard against its global size; a plain tensor
    counts fully in both.
    """
    from torch.distributed.tensor import DTensor

    local = total = 0
    for t in tensors:
        if isinstance(t, DTensor):
            local += t.to_local().numel()
            total += t.numel()
        elif isinstance(t, torch.Tensor):
            local += t.numel()
            total += t.numel()
    return local, total


def rollout_phase_of(module: nn.Module) -> contextlib.AbstractContextManager:
    """The rollout-phase context of any LightningModule, for callbacks.

    A :class:`~lit_reason.methods.base.ReasoningModule` knows its models (the reference lives
    outside its module tree); any other module gets every FSDP unit of its own tree gathered.
    """
    phase = getattr(module, "rollout_phase", None)
    return phase() if callable(phase) else gathered(module)
