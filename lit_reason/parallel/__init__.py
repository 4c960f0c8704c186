"""Scale-out machinery: FSDP2 sharding of every model a method holds, and the rollout-phase gather."""

from lit_reason.parallel.fsdp import (
    decoder_layers,
    fsdp_mesh,
    fsdp_units,
    full_state_dict,
    gathered,
    is_sharded,
    local_numel,
    mixed_precision_policy,
    rollout_phase_of,
    shard_frozen,
    shard_model,
    unsharded_copy,
)

__all__ = ["decoder_layers", "fsdp_mesh", "fsdp_units", "full_state_dict", "gathered", "is_sharded", "local_numel",
           "mixed_precision_policy", "rollout_phase_of", "shard_frozen", "shard_model",
           "unsharded_copy"]
