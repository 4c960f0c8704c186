"""The embedded default: a tiny Llama-style model and a tokenizer the project builds itself.

Nothing here touches the network. The tokenizer is a byte-level BPE (so any text, GSM8K or MATH
included, encodes losslessly) whose pre-tokenizer splits every digit on its own, which makes
multi-digit arithmetic learnable by a few-million-parameter model. It is trained on a fixed,
seeded corpus, so two builds give the same vocabulary.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# Generic English/maths fragments so that real-data prompts (GSM8K, MATH) tokenise compactly too.
_GENERIC_TEXT = (
    "Question: Answer: Compute the value of the following. Natalia sold clips to 48 of her friends "
    "in April, and then she sold half as many clips in May. How many clips did she sell altogether? "
    "The answer is #### A: Let x be the number. Then the total is x + y = z, so each has "
    "\\boxed{\\frac{1}{2}} dollars per hour. She earns $12 an hour. What is the sum of the "
    "solutions? We have therefore and since it follows that there are more than less times "
    "minutes hours days week year cost price money each every total left remaining how many much"
)


def _corpus(seed: int = 0, n: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = [_GENERIC_TEXT] * 20
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        lines.append(f"Compute: {a} {op} {b}\n{a} {op} {b} = {a + b}\nAnswer: {a + b}\n")
    return lines


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Builds the project's byte-level BPE tokenizer (deterministic; no download).

    Args:
        vocab_size: Target vocabulary size including the 256 byte symbols and special tokens.

    Returns:
        A fast tokenizer with ``<pad>``, ``<s>``, ``</s>`` (EOS) and ``<unk>``; offsets are exact.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 768,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> LlamaForCausalLM:
    """Builds a randomly initialised tiny Llama-style causal LM (a few million parameters).

    Args:
        tokenizer: The tokenizer whose vocabulary and special ids the model uses.
        hidden_size: Width of the residual stream.
        num_layers: Number of decoder layers.
        num_heads: Attention heads (key/value heads are the same).
        intermediate_size: Width of the SwiGLU MLP.
        max_position_embeddings: Longest sequence the RoPE cache is built for.
        seed: Seed of the initialisation, so the embedded default is reproducible.

    Returns:
        A ``LlamaForCausalLM`` in float32 that round-trips through ``save_pretrained``.
    """
    return init_causal_lm(LlamaConfig, LlamaForCausalLM, tokenizer, seed=seed, hidden_size=hidden_size,
                          intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                          num_attention_heads=num_heads, num_key_value_heads=num_heads,
                          max_position_embeddings=max_position_embeddings, tie_word_embeddings=True)


def init_causal_lm(config_cls, model_cls, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config_kwargs):
    """A randomly initialised ``model_cls`` sized to ``tokenizer`` (vocabulary, pad/BOS/EOS ids).

    The initialisation runs under a forked RNG seeded with ``seed``, so the caller's random state is
    untouched and two builds are identical (the embedded default and the GPU recipes' stand-ins).

    Args:
        config_cls: A transformers config class (``LlamaConfig``, ``Qwen2Config`` ...).
        model_cls: The matching causal-LM class.
        tokenizer: The tokenizer the model will be used with.
        seed: Initialisation seed.
        **config_kwargs: Sizes and other config fields.
    """
    import torch

    config = config_cls(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model_cls(config)
