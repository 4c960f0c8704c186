"""Supervised (prompt, solution) sequences for SFT and RFT."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset


class SFTDataset(Dataset):
    """Tokenised ``prompt + solution + EOS`` examples; the loss covers the solution and EOS.

    Args:
        tokenizer: Tokenizer of the policy.
        prompts: Prompt texts.
        solutions: Target response texts (no EOS).
        max_length: Sequences longer than this are rejected with the offending index (never
            silently cut: a cut solution loses its answer line and would teach truncation).
    """

    def __init__(self, tokenizer, prompts: Sequence[str], solutions: Sequence[str], max_length: int = 256) -> None:
        if len(prompts) != len(solutions):
            raise ValueError(f"{len(prompts)} prompts but {len(solutions)} solutions")
        self.items = []
        eos = tokenizer.eos_token_id
        for i, (p, s) in enumerate(zip(prompts, solutions)):
            p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            s_ids = tokenizer(s, add_special_tokens=False)["input_ids"] + [eos]
            if len(p_ids) + len(s_ids) > max_length:
                raise ValueError(
                    f"SFT example {i} has {len(p_ids) + len(s_ids)} tokens > max_length={max_length}; "
                    "raise max_length or filter the data"
                )
            self.items.append((p_ids, s_ids))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate_sft(items, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pads ``prompt + solution`` sequences.

    Returns:
        ``input_ids`` [B, T], ``attention_mask`` [B, T], ``loss_mask`` [B, T-1] (1 where the next
        token is a solution token; aligned with the shifted targets ``input_ids[:, 1:]``).
    """
    T = max(len(p) + len(s) for p, s in items)
    B = len(items)
    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T - 1))
    for b, (p, s) in enumerate(items):
        seq = p + s
        ids[b, : len(seq)] = torch.as_tensor(seq)
        att[b, : len(seq)] = 1
        loss_mask[b, len(p) - 1 : len(seq) - 1] = 1
    return {"input_ids": ids, "attention_mask": att, "loss_mask": loss_mask}
