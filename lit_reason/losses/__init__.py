"""Pure loss and advantage functions of lit_reason, one module per method family.

Every function works on plain tensors (no model, no I/O) and cites the paper equation it
implements (arXiv link) and the docs/<method>.md page that explains it. Losses return
``(loss, metrics)`` with ``metrics`` a dict of detached scalars.
"""

from lit_reason.losses.common import (
    broadcast_sequence_values,
    broadcast_step_values,
    check_same_shape,
    masked_mean,
    masked_sum,
    masked_whiten,
)
from lit_reason.losses.dpo import dpo_loss, sequence_logratios
from lit_reason.losses.dqo import dqo_lambda_returns, dqo_losses
from lit_reason.losses.dvo import dvo_loss, step_logratios, targets_from_q, targets_from_values
from lit_reason.losses.dvpo import dvpo_advantages, gvm_loss, td_lambda_targets
from lit_reason.losses.grpo import grpo_advantages, rloo_advantages
from lit_reason.losses.oreo import (
    oreo_importance_weights,
    oreo_policy_loss,
    oreo_response_loss,
    oreo_step_policy_loss,
    oreo_value_loss,
)
from lit_reason.losses.ppo import gae_advantages, ppo_policy_loss, terminal_rewards, value_loss
from lit_reason.losses.sft import sft_loss
from lit_reason.losses.vineppo import (
    fill_values_backward,
    value_estimation_mask,
    vineppo_step_advantages,
    vineppo_token_advantages,
)

__all__ = [
    "dpo_loss",
    "sequence_logratios",
    "dqo_lambda_returns",
    "dqo_losses",
    "dvo_loss",
    "step_logratios",
    "targets_from_q",
    "targets_from_values",
    "dvpo_advantages",
    "gvm_loss",
    "td_lambda_targets",
    "oreo_importance_weights",
    "oreo_policy_loss",
    "oreo_response_loss",
    "oreo_step_policy_loss",
    "oreo_value_loss",
    "broadcast_sequence_values",
    "broadcast_step_values",
    "check_same_shape",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "grpo_advantages",
    "rloo_advantages",
    "gae_advantages",
    "ppo_policy_loss",
    "terminal_rewards",
    "value_loss",
    "sft_loss",
    "fill_values_backward",
    "value_estimation_mask",
    "vineppo_step_advantages",
    "vineppo_token_advantages",
]
