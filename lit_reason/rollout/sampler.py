"""Batched sampling with a KV cache, and ``continue_from`` for Monte Carlo values.

The engine is deliberately small (``sample``/``continue_from``), so that a vLLM backend can sit
behind the same two calls on GPUs. Here it drives any Hugging Face causal LM directly: prompts are
left-padded and prefilled once; for ``k`` samples per prompt the prefilled KV cache is repeated
``k`` times (``batch_repeat_interleave``) instead of re-encoding the prompt ``k`` times, which is
what makes per-step Monte Carlo value estimation affordable.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from lit_reason.models.logprobs import position_ids_from_mask


@dataclass
class Generation:
    """One sampled continuation.

    Attributes:
        ids: Generated token ids (EOS included when it was generated).
        finish: ``"eos"``, ``"stop"`` (a stop string appeared) or ``"length"`` (truncated).
    """

    ids: list[int]
    finish: str

    @property
    def finished(self) -> bool:
        return self.finish != "length"


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Masks logits outside the nucleus of probability mass ``top_p`` (keeps at least one token).

    Args:
        logits: [N, V].
        top_p: In (0, 1]; 1 keeps everything.

    Returns:
        [N, V] logits with -inf outside the nucleus.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # drop a token when the mass strictly before it already reaches top_p
    drop_sorted = probs.cumsum(-1) - probs >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Rejects sampling settings that would silently misbehave (a negative temperature inverts the
    distribution; top_p = 0 masks every token)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class RolloutEngine:
    """Samples continuations of token prefixes from a causal LM.

    Args:
        model: A Hugging Face causal LM (plain or peft-wrapped).
        tokenizer: Its tokenizer (``pad_token_id``/``eos_token_id`` are used).
        max_new_tokens: Tokens generated at most per continuation.
        temperature: Sampling temperature (0 means greedy).
        top_p: Nucleus mass.
        stop_strings: A continuation also ends once its text contains one of these.
        batch_size: Sequences decoded together (prompts x samples) per forward pass.
        seed: Seed of the engine's own generator, so sampling is reproducible on CPU.
        progress: Show a progress bar over chunks.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_strings: Sequence[str] = (),
        batch_size: int = 64,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        check_sampling(temperature, top_p, max_new_tokens)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs pad and eos tokens for batched sampling")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.stop_strings = tuple(stop_strings)
        self.batch_size = batch_size
        self.progress = progress
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.generated_tokens = 0  # running count, for throughput benchmarks

    def reseed(self, seed: int) -> None:
        """Resets the sampling generator."""
        self.generator.manual_seed(seed)

    @torch.no_grad()
    def sample(
        self,
        prefixes: Sequence[Sequence[int]],
        k: int = 1,
        temperature: float | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
        stop_strings: Sequence[str] | None = None,
        desc: str = "rollout",
    ) -> list[Generation]:
        """Samples ``k`` continuations of every prefix; each prefix is encoded once.

        Args:
            prefixes: N token-id lists (a prompt, or a prompt plus a partial response).
            k: Continuations per prefix.
            temperature: Overrides the engine's temperature (0 = greedy).
            top_p: Overrides the engine's nucleus mass.
            max_new_tokens: Overrides the engine's length limit.
            stop_strings: Overrides the engine's stop strings.
            desc: Progress-bar label.

        Returns:
            N * k generations, prefix-major: entries ``[i*k, (i+1)*k)`` continue prefix i.
        """
        if k < 1:
            raise ValueError(f"k (continuations per prefix) must be >= 1, got {k}")
        for i, p in enumerate(prefixes):
            if len(p) == 0:
                raise ValueError(f"prefix {i} is empty: every prefix needs at least one token")
        temperature = self.temperature if temperature is None else temperature
        top_p = self.top_p if top_p is None else top_p
        max_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        # per-call overrides get the constructor's checks
        check_sampling(temperature, top_p, max_new)
        stops = self.stop_strings if stop_strings is None else tuple(stop_strings)
        per_chunk = max(1, self.batch_size // k)
        chunks = [prefixes[i : i + per_chunk] for i in range(0, len(prefixes), per_chunk)]
        out: list[Generation] = []
        with eval_mode(self.model):
            bar = tqdm(chunks, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)
            for chunk in bar:
                out.extend(self._sample_chunk(chunk, k, temperature, top_p, max_new, stops))
        return out

    def continue_from(self, prefixes: Sequence[Sequence[int]], k: int, **kwargs) -> list[Generation]:
        """Monte Carlo continuations: ``k`` per prefix, sharing the prefix's KV cache.

        Same as :meth:`sample`; named for its use (V(S) = mean reward of k continuations of S).
        """
        return self.sample(prefixes, k, desc=kwargs.pop("desc", "mc rollouts"), **kwargs)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _sample_chunk(self, prefixes, k, temperature, top_p, max_new, stops) -> list[Generation]:
        device = self._device()
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(len(p) for p in prefixes)
        ids = torch.full((len(prefixes), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prefixes), width), dtype=torch.long)
        for i, p in enumerate(prefixes):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True)
        cache = _cache_of(out)
        logits = out.logits[:, -1].float()
        if k > 1:
            # the one place the prefix would otherwise be recomputed k times
            cache.batch_repeat_interleave(k)
            logits = logits.repeat_interleave(k, 0)
            mask = mask.repeat_interleave(k, 0)
        n = logits.shape[0]
        tokens: list[list[int]] = [[] for _ in range(n)]
        finish = ["length"] * n
        done = torch.zeros(n, dtype=torch.bool, device=device)
        stop_tail = max((len(s) for s in stops), default=0) + 8
        for step in range(max_new):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = top_p_filter(logits / temperature, top_p).softmax(-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(-1).to(device)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            live = (~done).nonzero().flatten().tolist()
            nxt_list = nxt.tolist()
            for i in live:
                tokens[i].append(nxt_list[i])
                if nxt_list[i] == eos:
                    finish[i] = "eos"
                elif stops:
                    tail = self.tokenizer.decode(tokens[i][-stop_tail:], skip_special_tokens=True)
                    if any(s in tail for s in stops):
                        finish[i] = "stop"
            self.generated_tokens += len(live)
            done_now = torch.tensor([f != "length" for f in finish], device=device)
            mask = torch.cat([mask, (~done).long().unsqueeze(-1)], dim=1)
            done = done_now
            if bool(done.all()) or step == max_new - 1:
                break
            pos = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)
            out = self.model(
                input_ids=nxt.unsqueeze(-1), attention_mask=mask, position_ids=pos, use_cache=True,
                **{_cache_kwarg(self.model): cache},
            )
            cache = _cache_of(out)
            logits = out.logits[:, -1].float()
        return [Generation(ids=t, finish=f) for t, f in zip(tokens, finish)]


def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument: ``cache`` in recent transformers, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@contextlib.contextmanager
def eval_mode(model):
    """Temporarily puts ``model`` in eval mode."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
