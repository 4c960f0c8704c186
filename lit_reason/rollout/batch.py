"""The trajectory batch: one plain dataclass of tensors that every stage passes along.

Layout (B sequences, prompts left-padded to P tokens, responses right-padded to L tokens)::

    input_ids       [B, P+L]  prompt ids | response ids (pad outside the masks)
    attention_mask  [B, P+L]  1 on real prompt and response tokens
    response_mask   [B, L]    1 on response tokens that are scored (EOS included)
    step_ids        [B, L]    step index of each response token, -1 on padding
    step_ends       [B, S]    index (into the response) of each step's last token, -1 past num_steps
    num_steps       [B]       number of steps T of each response
    rewards         [B]       outcome reward R of each response
    finished        [B]       True when the response ended with EOS or a stop string (not truncated)
    group_ids       [B]       index of the prompt a response answers (samples of a prompt share it)

Optional per-token tensors shared by the online methods (``old_logprobs``, ``ref_logprobs``,
``advantages``) are filled by the targets stage; a sampled rollout comes with ``old_logprobs``
already (the sampler's own log-probs at its temperature). A method's own per-row data goes into ``extras``
(VinePPO: ``step_values`` [B, S]; PPO: ``old_values``, ``returns`` [B, L]; DVPO: ``old_values``) (name -> tensor with the batch as its first
dimension: ``[B]``, ``[B, L]``, ``[B, S]`` ...), which ``to``, ``select``, ``concat``, ``save`` and
``load`` handle like the fields above, so adding a method never adds a field here.

On disk (``save``/``load``) a batch is one ``torch.save`` file of a dict of tensors, numbers,
strings and lists with a ``format`` version key, read back with ``weights_only=True`` (no
arbitrary pickled objects), written to a temp file and renamed so a crash never leaves half a file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from lit_reason.io import atomic_file

FORMAT_VERSION = 1
_OPTIONAL_TENSORS = ("old_logprobs", "ref_logprobs", "advantages")
# fields of format-1 files written before these moved into ``extras``; ``load`` moves them there
_LEGACY_EXTRAS = ("step_values", "returns", "old_values")


@dataclass
class TrajectoryBatch:
    """A batch of prompt/response trajectories with their step spans and rewards (see module doc)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    step_ids: torch.Tensor
    step_ends: torch.Tensor
    num_steps: torch.Tensor
    rewards: torch.Tensor
    finished: torch.Tensor
    group_ids: torch.Tensor
    prompt_len: int
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_ids(self) -> torch.Tensor:
        """Response token ids [B, L]."""
        return self.input_ids[:, self.prompt_len :]

    @property
    def prompt_ids(self) -> torch.Tensor:
        """Left-padded prompt token ids [B, P]."""
        return self.input_ids[:, : self.prompt_len]

    def to(self, device: torch.device | str) -> "TrajectoryBatch":
        """Returns a copy with every tensor moved to ``device``."""
        changes = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        changes["extras"] = {k: v.to(device) for k, v in self.extras.items()}
        return dataclasses.replace(self, **changes)

    def select(self, index: torch.Tensor | list[int]) -> "TrajectoryBatch":
        """Returns the sub-batch of rows ``index`` (tensors indexed, lists picked)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = value[idx.to(value.device)]
            elif isinstance(value, list) and value:
                changes[f.name] = [value[i] for i in idx.tolist()]
        changes["extras"] = {k: v[idx.to(v.device)] for k, v in self.extras.items()}
        return dataclasses.replace(self, **changes)

    def state_dict(self) -> dict[str, Any]:
        """The on-disk form: plain tensors and lists plus a format version."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["format"] = FORMAT_VERSION
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Writes the batch atomically (temp file in the same folder, then rename)."""
        with atomic_file(path, "wb") as fh:
            torch.save(self.to("cpu").state_dict(), fh)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrajectoryBatch":
        """Reads a batch written by :meth:`save`; a foreign or truncated file gets a clear error."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated files and foreign objects raise several types
            raise ValueError(f"trajectory file {path} is unreadable (truncated or not a lit_reason batch): {err}") from err
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
            raise ValueError(f"trajectory file {path} has no lit_reason format {FORMAT_VERSION} header")
        state.pop("format")
        for name in _LEGACY_EXTRAS:
            value = state.pop(name, None)
            if value is not None:
                state.setdefault("extras", {})[name] = value
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in names if n not in state and n not in _OPTIONAL_TENSORS
                   and n not in ("prompts", "responses", "examples", "extras")]
        if missing:
            raise ValueError(f"trajectory file {path} lacks fields {missing}")
        return cls(**{k: v for k, v in state.items() if k in names})

    @staticmethod
    def concat(batches: list["TrajectoryBatch"], pad_token_id: int) -> "TrajectoryBatch":
        """Concatenates batches, re-padding prompts (left) and responses/steps (right)."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        P = max(b.prompt_len for b in batches)
        L = max(b.response_mask.shape[1] for b in batches)
        S = max(b.step_ends.shape[1] for b in batches)

        def pad(t: torch.Tensor, width: int, value: float, left: bool = False) -> torch.Tensor:
            extra = width - t.shape[1]
            if extra == 0:
                return t
            filler = torch.full((t.shape[0], extra, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
            return torch.cat([filler, t] if left else [t, filler], dim=1)

        parts: dict[str, list] = {}
        for b in batches:
            ids = torch.cat([pad(b.prompt_ids, P, pad_token_id, left=True), pad(b.response_ids, L, pad_token_id)], 1)
            am = torch.cat([pad(b.attention_mask[:, : b.prompt_len], P, 0, left=True), pad(b.attention_mask[:, b.prompt_len :], L, 0)], 1)
            row = {
                "input_ids": ids,
                "attention_mask": am,
                "response_mask": pad(b.response_mask, L, 0),
                "step_ids": pad(b.step_ids, L, -1),
                "step_ends": pad(b.step_ends, S, -1),
            }
            for name in _OPTIONAL_TENSORS:
                value = getattr(b, name)
                if value is not None:
                    row[name] = pad(value, L, 0.0)
            for name, value in row.items():
                parts.setdefault(name, []).append(value)
        out: dict[str, Any] = {k: torch.cat(v) for k, v in parts.items()}
        out["extras"] = _concat_extras(batches, pad)
        for name in _OPTIONAL_TENSORS:
            if name in out and len(parts[name]) != len(batches):
                raise ValueError(f"cannot concat: only some batches carry {name}")
        for name in ("num_steps", "rewards", "finished"):
            out[name] = torch.cat([getattr(b, name) for b in batches])
        # prompts of different batches are different groups: offset each batch's ids past the last
        groups, offset = [], 0
        for b in batches:
            groups.append(b.group_ids + offset)
            offset += int(b.group_ids.max()) + 1 if len(b) else 0
        out["group_ids"] = torch.cat(groups)
        for name in ("prompts", "responses", "examples"):
            out[name] = [x for b in batches for x in getattr(b, name)]
        return TrajectoryBatch(prompt_len=P, **out)


def _concat_extras(batches: list[TrajectoryBatch], pad) -> dict[str, torch.Tensor]:
    """Concatenates every ``extras`` entry; ``[B, W, ...]`` ones are right-padded with 0 to the widest."""
    names = set(batches[0].extras)
    for b in batches[1:]:
        if set(b.extras) != names:
            raise ValueError(f"cannot concat: extras differ ({sorted(names)} vs {sorted(b.extras)})")
    out = {}
    for name in sorted(names):
        values = [b.extras[name] for b in batches]
        if values[0].dim() >= 2:
            width = max(v.shape[1] for v in values)
            values = [pad(v, width, 0) for v in values]
        out[name] = torch.cat(values)
    return out
