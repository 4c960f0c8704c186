"""Value models: a causal-LM trunk with a scalar head, read at every position.

Used as PPO's critic (separate trunk initialised from the policy checkpoint), OREO/DQO's value
model (zero-initialised, bias-free head), and DVPO's global value model.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_reason.models.logprobs import position_ids_from_mask
from lit_reason.models.policy import build_policy


def lm_trunk(causal_lm) -> nn.Module:
    """The transformer body of a causal LM (without its LM head)."""
    prefix = getattr(causal_lm, "base_model_prefix", "model")
    trunk = getattr(causal_lm, prefix, None)
    if trunk is None:
        raise ValueError(f"cannot find the trunk `{prefix}` of {type(causal_lm).__name__}")
    return trunk


class ValueModel(nn.Module):
    """V(prefix ending at token t) for every t: trunk hidden state -> Linear(hidden, 1).

    Args:
        trunk: A transformer body returning ``last_hidden_state``.
        hidden_size: Width of its hidden states.
        bias: Whether the head has a bias (PPO/DVPO: yes; OREO: no).
        zero_init: Start the head at zero, so every value starts at 0 (OREO, DVPO).
    """

    def __init__(self, trunk: nn.Module, hidden_size: int, bias: bool = True, zero_init: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden_size, 1, bias=bias)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            if bias:
                nn.init.zeros_(self.head.bias)
        else:
            nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
            if bias:
                nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy_name(cls, name: str, dtype: str | None = None, lora: dict | None = None,
                         tiny: dict | None = None, bias: bool = True, zero_init: bool = False) -> "ValueModel":
        """A fresh value model on a trunk loaded from a policy checkpoint (a separate copy)."""
        lm, _ = build_policy(name, dtype=dtype, lora=lora, tiny=tiny)
        hidden = lm.config.hidden_size
        model = cls(lm_trunk(lm.base_model.model if lora else lm), hidden, bias=bias, zero_init=zero_init)
        return model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Values at every position.

        Args:
            input_ids: [B, T].
            attention_mask: [B, T].

        Returns:
            [B, T] float values; entry t is the value of the prefix ending at token t.
        """
        out = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask))
        hidden = out.last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def response_values(self, input_ids, attention_mask, prompt_len: int) -> torch.Tensor:
        """[B, L] V(s_t) for each response token t, where s_t = (x, y_<t) ends at position P-1+t."""
        return self(input_ids, attention_mask)[:, prompt_len - 1 : -1]


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] value at the last real token of each right-padded row of ``values`` [B, T]."""
    last = attention_mask.long().sum(-1) - 1
    return values.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1)
