"""Small helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations


def force_eos(module, bonus: float = 4.0):
    """Makes a module's policy end responses early: a forward hook adds ``bonus`` to the EOS logit.

    Returns the hook handle (``.remove()`` undoes it).
    """
    eos = module.tokenizer.eos_token_id

    def hook(_mod, _inp, out):
        out.logits[..., eos] += bonus
        return out

    return module.policy.register_forward_hook(hook)
