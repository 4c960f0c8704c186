"""Value models: a causal-LM trunk with a scalar head, read at every position.

Used as PPO's critic (separate trunk initialised from the policy checkpoint), OREO/DQO's value
model (zero-initialised, bias-free head), and DVPO's global value model. With a LoRA policy, PPO's
critic and OREO/DQO's value model can instead share the policy's trunk through their own adapter
(:meth:`ValueModel.shared_with`, :mod:`lit_reason.models.shared_trunk`).
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from lit_reason.io import atomic_dir
from lit_reason.models.logprobs import position_ids_from_mask
from lit_reason.models.policy import build_policy
from lit_reason.models.shared_trunk import SharedTrunk


VALUE_FORMAT = "lit_reason.value_model"
VALUE_HEAD_CONFIG = "value_head.json"
VALUE_HEAD_WEIGHTS = "value_head.pt"


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
        self.shared: SharedTrunk | None = None  # set by shared_with: the trunk is the policy's
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
        if lora:
            # kept outside the module tree (a list), so ``save`` can merge the adapter into the trunk
            model._peft_wrapper = [lm]
        return model

    @classmethod
    def shared_with(cls, policy, lora: dict, bias: bool = True, zero_init: bool = False) -> "ValueModel":
        """A fresh value model on the LoRA ``policy``'s own trunk, trained through a new adapter.

        No second copy of the base weights: the trunk is the policy's transformer body, and every
        forward of this model runs the ``value`` adapter (:class:`~lit_reason.models.shared_trunk.SharedTrunk`).
        Its trainable parameters are that adapter's and the head's (:meth:`trainable_parameters`).

        Args:
            policy: A ``peft.PeftModel`` (the policy built with ``lora``).
            lora: ``peft.LoraConfig`` arguments of the value adapter.
            bias: Whether the head has a bias.
            zero_init: Start the head at zero.
        """
        shared = SharedTrunk(policy, lora)
        model = cls(shared.body, policy.config.hidden_size, bias=bias, zero_init=zero_init)
        model.shared = shared  # a plain object: not a submodule (the policy is registered where it lives)
        return model

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What this model's optimiser trains: the value adapter and the head on a shared trunk, else
        every parameter that requires grad (a shared trunk also holds the policy's adapter)."""
        if self.shared is not None:
            return self.shared.value_parameters() + list(self.head.parameters())
        return [p for p in self.parameters() if p.requires_grad]

    def save(self, dirpath: str | os.PathLike, tokenizer=None) -> Path:
        """Writes the value model to ``dirpath`` (atomically: temp folder, then rename).

        Layout: the trunk as a ``save_pretrained`` folder (a LoRA adapter merged in first; on a
        trunk shared with the policy, the value adapter only), the
        head in ``value_head.pt`` and ``value_head.json`` (``format``, ``version``, ``hidden_size``,
        ``bias``), and the tokenizer when given. :meth:`load` reads it back.
        """
        dirpath = Path(dirpath)
        with atomic_dir(dirpath) as tmp:  # temp folder beside it, then swapped in
            trunk = self.trunk
            wrapper = getattr(self, "_peft_wrapper", None)
            if self.shared is not None:
                trunk = self.shared.merged_value_body()
            elif wrapper:
                trunk = lm_trunk(copy.deepcopy(wrapper[0]).merge_and_unload())
            trunk.save_pretrained(tmp)
            torch.save({k: v.detach().cpu() for k, v in self.head.state_dict().items()}, tmp / VALUE_HEAD_WEIGHTS)
            meta = {"format": VALUE_FORMAT, "version": 1, "hidden_size": self.head.in_features,
                    "bias": self.head.bias is not None}
            (tmp / VALUE_HEAD_CONFIG).write_text(json.dumps(meta, indent=1))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return dirpath

    @classmethod
    def load(cls, dirpath: str | os.PathLike, dtype: str | None = None) -> "ValueModel":
        """Reads a folder written by :meth:`save`.

        Raises:
            FileNotFoundError / ValueError naming the folder: no ``value_head.json`` (not a value
            model: a policy folder, say), another format, or a head that does not fit the trunk.
        """
        from transformers import AutoModel

        from lit_reason.models.loading import check_checkpoint_dir, resolve_dtype

        dirpath = Path(dirpath).expanduser()
        cfg_file = dirpath / VALUE_HEAD_CONFIG
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"{dirpath} is not a lit_reason value model: it has no {VALUE_HEAD_CONFIG} (write one with "
                "ValueModel.save; a policy folder is not a value model)"
            )
        meta = json.loads(cfg_file.read_text())
        if meta.get("format") != VALUE_FORMAT:
            raise ValueError(f"{cfg_file}: format {meta.get('format')!r}, expected {VALUE_FORMAT!r}")
        check_checkpoint_dir(dirpath)
        kwargs = {"dtype": resolve_dtype(dtype)} if dtype else {}
        trunk = AutoModel.from_pretrained(str(dirpath), **kwargs)
        if trunk.config.hidden_size != meta["hidden_size"]:
            raise ValueError(f"{dirpath}: head width {meta['hidden_size']} != trunk hidden size "
                             f"{trunk.config.hidden_size}")
        model = cls(trunk, meta["hidden_size"], bias=bool(meta["bias"]))
        try:
            model.head.load_state_dict(torch.load(dirpath / VALUE_HEAD_WEIGHTS, map_location="cpu"))
        except (RuntimeError, FileNotFoundError) as err:
            raise ValueError(f"{dirpath}: bad value head weights ({err})") from err
        return model

    def values_of(self, sequences: list[list[int]], pad_token_id: int, batch_size: int = 128,
                  eos_token_id: int | None = None) -> torch.Tensor:
        """[N] value at the last token of each (unpadded) token sequence, in chunks of ``batch_size``.

        With ``eos_token_id``, a sequence ending with EOS (a terminal state) is read at the token
        before it: the state whose next action is EOS. Value models are trained on the states
        before each response token (:meth:`response_values`), never at the EOS position itself, so
        the value there is untrained.
        """
        if eos_token_id is not None:
            sequences = [list(s[:-1]) if len(s) > 1 and s[-1] == eos_token_id else s for s in sequences]
        device = self.head.weight.device
        out = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
                mask[i, : len(s)] = 1
            ids, mask = ids.to(device), mask.to(device)
            out.append(last_token_values(self(ids, mask), mask))
        return torch.cat(out) if out else torch.zeros(0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Values at every position.

        Args:
            input_ids: [B, T].
            attention_mask: [B, T].

        Returns:
            [B, T] float values; entry t is the value of the prefix ending at token t.
        """
        with self.shared.value_forward() if self.shared is not None else nullcontext():
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
