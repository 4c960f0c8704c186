"""Tiny stand-ins of real architecture families, to run a GPU recipe end to end on a CPU.

A GPU recipe (``recipes/gpu/*.yaml``) names a hub policy of some architecture family (RhoMath 1.1B
is a ``LlamaForCausalLM``, Qwen2.5-Math-1.5B a ``Qwen2ForCausalLM``). :func:`build_standin` writes
a ``save_pretrained`` folder holding a randomly initialised model of the *same class* at a tiny
size, with the project's own tokenizer (:func:`lit_reason.models.tiny.build_tokenizer`, the
vocabulary sized to it). Passing that folder as the recipe's policy runs every line of the recipe
through the real loading path (``load_policy`` with a folder, LoRA, value-model trunks) in seconds::

    python -c "from lit_reason.models.standin import build_standin; build_standin('qwen2', '/tmp/qwen2-standin')"
    python -m lit_reason fit --config recipes/gpu/oreo_gsm8k.yaml --trainer.accelerator cpu --trainer.devices 1 \\
        --trainer.precision 32-true --model.init_args.policy /tmp/qwen2-standin ...

``tests/test_gpu_recipes.py`` does exactly this for every GPU recipe.

**Finishing responses.** A random model almost never samples EOS (about 1 in ``len(vocab)`` per
token), so the online loop would skip every iteration ("no response finished") and no optimiser
step would run. The stand-in is therefore *steered*: channel 0 of the residual stream is held at a
constant (1.0 in every input embedding, and no attention or MLP output projection writes to it), so
after the final RMSNorm it reads about ``sqrt(hidden_size)`` at every position, and the untied LM
head's column 0 turns it into a fixed logit bonus for EOS (``eos_logit``) and for the newline
token (``newline_logit``, so responses have several steps). The bonus is baked into the weights
(it survives ``save_pretrained``/``from_pretrained``), and every parameter stays trainable.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

__all__ = ["CHAT_TEMPLATE", "FAMILIES", "build_standin", "build_standin_model"]

# A ChatML-shaped template over the project tokenizer's own special tokens (<s> opens a turn, </s>
# = EOS closes it), for stand-ins of chat models (Qwen2.5's tokenizers carry ChatML): recipes with
# ``prompt_format: chat`` then run their chat path on the stand-in.
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

# family -> (config class name, model class name) in transformers; one family per real model class
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),  # TinyLlama / RhoMath-1.1B, Llama 3, DeepSeekMath
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),  # Qwen2 / Qwen2.5(-Math): Llama + q/k/v biases
}


def build_standin_model(
    family: str,
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    eos_logit: float = 4.0,
    newline_logit: float = 4.0,
    token_logits: dict[str, float] | None = None,
    seed: int = 0,
):
    """A tiny, steered causal LM of ``family`` for ``tokenizer`` (see the module doc).

    Args:
        family: A key of :data:`FAMILIES` (``llama``, ``qwen2``).
        tokenizer: The tokenizer; the vocabulary and the pad/BOS/EOS ids are taken from it.
        hidden_size: Width of the residual stream (channel 0 is the constant steering channel).
        num_layers: Decoder layers.
        num_heads: Query heads.
        num_key_value_heads: Key/value heads (fewer than ``num_heads``: grouped-query attention,
            as the real 1-2B models of both families use).
        intermediate_size: Width of the SwiGLU MLP.
        max_position_embeddings: Longest sequence (GSM8K prompts are a few hundred tokens here).
        eos_logit: Approximate logit bonus of EOS at every position (0: no steering).
        newline_logit: Approximate logit bonus of ``"\\n"`` (the step delimiter).
        token_logits: Further bonuses, ``{text: logit}`` for texts that are one token each (e.g.
            ``{"4": 4.0}`` makes a response often end on the number 4, so that some responses to
            problems whose answer is 4 earn reward 1 and the rewards of a batch differ).
        seed: Initialisation seed.

    Returns:
        The model, in float32, with ``tie_word_embeddings=False`` (the steering needs an LM head
        of its own).

    Raises:
        ValueError: ``family`` is unknown, or a ``token_logits`` text is not exactly one token.
    """
    import transformers

    from lit_reason.models.tiny import init_causal_lm

    if family not in FAMILIES:
        raise ValueError(f"unknown stand-in family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    config_cls, model_cls = (getattr(transformers, name) for name in FAMILIES[family])
    model = init_causal_lm(config_cls, model_cls, tokenizer, seed=seed, hidden_size=hidden_size,
                           intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, num_key_value_heads=num_key_value_heads,
                           max_position_embeddings=max_position_embeddings, tie_word_embeddings=False)
    bonus = {"\n": newline_logit, **(token_logits or {})}
    ids = {}
    for text, logit in bonus.items():
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"stand-in logit bonus: {text!r} is {len(tokens)} tokens, not one; give single-token texts")
        ids[tokens[0]] = logit
    ids[tokenizer.eos_token_id] = eos_logit
    if any(ids.values()):
        _steer(model, ids)
    return model


@torch.no_grad()
def _steer(model, bonus: dict[int, float]) -> None:
    # channel 0 carries a constant: set in every embedding, written by no layer (o_proj and
    # down_proj have no bias in either family, so zeroing their row 0 is enough)
    model.get_input_embeddings().weight[:, 0] = 1.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[0].zero_()
        layer.mlp.down_proj.weight[0].zero_()
    # the final RMSNorm maps (1, ~0.02, ...) to ~sqrt(hidden) on channel 0
    scale = math.sqrt(model.config.hidden_size)
    head = model.get_output_embeddings().weight
    head[:, 0] = 0.0
    for token, logit in bonus.items():
        head[token, 0] = logit / scale


def build_standin(family: str, path: str | os.PathLike, chat_template: str | None = None, **kwargs) -> Path:
    """Writes a stand-in policy folder (model + project tokenizer) loadable as ``policy: PATH``.

    Args:
        family: A key of :data:`FAMILIES`.
        path: Output folder (created; an existing stand-in there is overwritten).
        chat_template: A Jinja chat template for the tokenizer (e.g. :data:`CHAT_TEMPLATE`), for
            recipes with ``prompt_format: chat``; None: none, as a base model's tokenizer.
        **kwargs: Size and steering overrides for :func:`build_standin_model`.

    Returns:
        ``path`` as a ``Path``.
    """
    from lit_reason.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    model = build_standin_model(family, tokenizer, **kwargs)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
