"""Small helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import copy

import torch


def force_eos(module, bonus: float = 4.0):
    """Makes a module's policy end responses early: a forward hook adds ``bonus`` to the EOS logit.

    Returns the hook handle (``.remove()`` undoes it).
    """
    eos = module.tokenizer.eos_token_id

    def hook(_mod, _inp, out):
        out.logits[..., eos] += bonus
        return out

    return module.policy.register_forward_hook(hook)


def biased_copy(model, tokenizer, newline: float = 4.0, eos: float = 2.5):
    """A copy of ``model`` whose logits favour newline and EOS (a forward hook on the LM head), so
    that the random tiny model's responses have several steps and some finish."""
    model = copy.deepcopy(model)
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer("\n", add_special_tokens=False)["input_ids"]] = newline
    bias[tokenizer.eos_token_id] = eos
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias.to(out.dtype))
    return model
