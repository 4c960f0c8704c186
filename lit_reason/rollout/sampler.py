"""Batched sampling with a KV cache, and ``continue_from`` for Monte Carlo values.

The engine is deliberately small (``sample``/``continue_from``), so that a vLLM backend can sit
behind the same two calls on GPUs. Here it drives any Hugging Face causal LM directly: prompts are
left-padded and prefilled once; for ``k`` samples per prompt the prefilled KV cache is repeated
``k`` times (``batch_repeat_interleave``) instead of re-encoding the prompt ``k`` times, which is
what makes per-step Monte Carlo value estimation affordable. The prefill computes the last
position's logits only, decoding writes the KV cache in place into buffers allocated once, and
finished rows leave the batch; none of this changes which tokens a seed samples
(``benchmarks/rollout_speed.py`` compares the engine with ``model.generate``).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

try:  # transformers >= 4.54 keeps a DynamicCache as a list of layers
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - older transformers: the cache grows by concatenation
    DynamicLayer = None

from lit_reason.models.logprobs import keep_logits_kwargs, position_ids_from_mask

# finish codes while decoding (one small tensor instead of a Python list per step)
_LENGTH, _EOS, _STOP = 0, 1, 2
_FINISH_NAMES = ("length", "eos", "stop")
# finished rows are dropped from the decoding batch once at most this fraction of it is still live
_DROP_FRACTION = 0.75


@dataclass
class Generation:
    """One sampled continuation.

    Attributes:
        ids: Generated token ids (EOS included when it was generated).
        finish: ``"eos"``, ``"stop"`` (a stop string appeared) or ``"length"`` (truncated).
        logprobs: log softmax(logits / temperature) of each generated token, over the full
            vocabulary (before any top-p cut): what :func:`~lit_reason.models.logprobs.response_logprobs`
            computes at that temperature, so PPO-style loops need no second pass for their old
            log-probs. None for greedy decoding.
    """

    ids: list[int]
    finish: str
    logprobs: list[float] | None = None

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
        drop_finished: Drop finished rows from the decoding batch (and the KV cache) once a quarter
            of it has finished, instead of decoding padding for them. The sampled tokens are the
            same either way.
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
        drop_finished: bool = True,
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
        self.drop_finished = drop_finished
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.generated_tokens = 0  # running count, for throughput benchmarks

    def reseed(self, seed: int) -> None:
        """Resets the sampling generator."""
        self.generator.manual_seed(seed)

    # no_grad, not inference_mode: FSDP's gathered parameters created under inference_mode cannot
    # be used for training afterwards (pytorch/pytorch#113203), and the saving here is negligible
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
        cache_kw = _cache_kwarg(self.model)
        width = max(len(p) for p in prefixes)
        ids = torch.full((len(prefixes), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prefixes), width), dtype=torch.long)
        for i, p in enumerate(prefixes):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True,
                         **_last_logits_kwargs(self.model))
        cache = _cache_of(out)
        logits = out.logits[:, -1].float()
        del out  # without logits_to_keep this holds [N, width, V] logits
        if k > 1:
            # the one place the prefix would otherwise be recomputed k times
            cache.batch_repeat_interleave(k)
            logits = logits.repeat_interleave(k, 0)
            mask = mask.repeat_interleave(k, 0)
        n = logits.shape[0]
        _preallocate(cache, width + max_new)
        # Bookkeeping covers all n continuations; the model sees only the `active` rows (all of them
        # until finished rows are dropped). The attention mask is preallocated for every step and
        # passed as a growing view instead of being re-concatenated each step.
        active = torch.arange(n, device=device)
        act_mask = torch.zeros((n, width + max_new), dtype=mask.dtype, device=device)
        act_mask[:, :width] = mask
        act_len = mask.sum(-1)  # real tokens per active row; the next token's position is act_len - 1
        tokens = torch.full((n, max_new), pad, dtype=torch.long, device=device)
        logprobs = torch.zeros((n, max_new), device=device) if temperature > 0 else None
        finish = torch.full((n,), _LENGTH, dtype=torch.long, device=device)
        ends = torch.full((n,), max_new, dtype=torch.long, device=device)  # generated length per row
        done = torch.zeros(n, dtype=torch.bool, device=device)
        stop_tail = max((len(s) for s in stops), default=0) + 8
        steps = 0
        for step in range(max_new):
            nxt = self._next_tokens(logits, active, n, temperature, top_p, pad).masked_fill(done, pad)
            live = ~done
            tokens[:, step] = nxt
            if logprobs is not None:
                # one logsumexp per step: far cheaper than re-scoring every response afterwards
                scaled = logits / temperature
                picked = nxt[active] if active.numel() < n else nxt
                logprobs[active, step] = scaled.gather(-1, picked.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(-1)
            finish.masked_fill_(live & (nxt == eos), _EOS)
            if stops:
                self._mark_stop_strings(tokens, step, live & (finish == _LENGTH), finish, stops, stop_tail)
            steps = step + 1
            self.generated_tokens += int(live.sum())
            # the token just sampled is real for rows that were live before it (an EOS included)
            live_act = live if active.numel() == n else live[active]
            act_mask[:, width + step] = live_act
            act_len += live_act
            done = finish != _LENGTH
            ends.masked_fill_(done & live, step + 1)
            if bool(done.all()) or step == max_new - 1:
                break
            if self.drop_finished:
                still = ~done[active]
                n_still = int(still.sum())
                if n_still <= _DROP_FRACTION * active.numel():
                    # finished rows only pad: drop them from the cache and the batch
                    keep = still.nonzero().flatten()
                    cache.batch_select_indices(keep)
                    active, act_mask, act_len = active[keep], act_mask[keep], act_len[keep]
            out = self.model(
                input_ids=nxt[active].unsqueeze(-1), attention_mask=act_mask[:, : width + step + 1],
                position_ids=(act_len - 1).clamp(min=0).unsqueeze(-1), use_cache=True, **{cache_kw: cache},
            )
            cache = _cache_of(out)
            logits = out.logits[:, -1].float()
        rows = tokens[:, :steps].tolist()
        lps = logprobs[:, :steps].tolist() if logprobs is not None else [None] * n
        return [Generation(ids=row[:end], finish=_FINISH_NAMES[f], logprobs=None if lp is None else lp[:end])
                for row, end, f, lp in zip(rows, ends.tolist(), finish.tolist(), lps)]

    def _next_tokens(self, logits, active, n, temperature, top_p, pad) -> torch.Tensor:
        """Next token of each of the n rows, from the logits of the active rows.

        Args:
            logits: [A, V] float logits of the active rows.
            active: [A] indices of the active rows among the n.
            n: All rows of the chunk.

        Returns:
            [n] token ids (``pad`` for rows that are not active).
        """
        if temperature == 0:
            picked = logits.argmax(-1)
            if active.numel() == n:
                return picked
            return torch.full((n,), pad, dtype=picked.dtype, device=picked.device).index_copy_(0, active, picked)
        probs = top_p_filter(logits / temperature, top_p).softmax(-1)
        if active.numel() < n:
            # Draw for all n rows as if none had been dropped: each row's draw then takes the same
            # part of the generator's stream, so the samples do not depend on when rows are dropped.
            full = probs.new_zeros(n, probs.shape[-1])
            full[:, pad] = 1.0
            probs = full.index_copy_(0, active, probs)
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(-1).to(logits.device)

    def _mark_stop_strings(self, tokens, step, candidates, finish, stops, stop_tail) -> None:
        """Marks ``_STOP`` in ``finish`` for candidate rows whose recent text contains a stop string.

        Only the candidate rows (live, not ended by EOS) are decoded, and only their last
        ``stop_tail`` tokens.

        Args:
            tokens: [n, max_new] generated ids so far (columns up to ``step`` filled).
            candidates: [n] bool.
            finish: [n] finish codes, updated in place.
        """
        rows = candidates.nonzero().flatten().tolist()
        if not rows:
            return
        tails = tokens[rows, max(0, step + 1 - stop_tail) : step + 1].tolist()
        hits = [r for r, tail in zip(rows, tails)
                if any(s in self.tokenizer.decode(tail, skip_special_tokens=True) for s in stops)]
        if hits:
            finish[hits] = _STOP


def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument: ``cache`` in recent transformers, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


if DynamicLayer is not None:

    class _PreallocatedLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys and values live in buffers allocated once for the whole decode.

        ``DynamicLayer.update`` concatenates, copying the layer's entire cache at every step; here a
        step writes its one position in place and ``keys``/``values`` are views [B, H, length, D]
        of the buffers [B, H, capacity, D].
        """

        _layer_type = None  # do not register as the default layer of any layer type

        def __init__(self, layer, capacity: int) -> None:
            super().__init__()
            batch, heads, length, dim = layer.keys.shape
            self.device, self.is_initialized, self.length = layer.keys.device, True, length
            self.key_buffer = layer.keys.new_empty(batch, heads, max(capacity, length), dim)
            self.value_buffer = layer.values.new_empty(batch, heads, max(capacity, length), layer.values.shape[-1])
            self.key_buffer[:, :, :length] = layer.keys
            self.value_buffer[:, :, :length] = layer.values
            self._expose()

        def _expose(self) -> None:
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            if end > self.key_buffer.shape[-2]:  # more steps than planned: double the room
                grow = max(end, 2 * self.key_buffer.shape[-2]) - self.key_buffer.shape[-2]
                self.key_buffer = torch.nn.functional.pad(self.key_buffer, (0, 0, 0, grow))
                self.value_buffer = torch.nn.functional.pad(self.value_buffer, (0, 0, 0, grow))
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
            self.length = end
            self._expose()
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
            self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
            self._expose()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._expose()


def _preallocate(cache, capacity: int) -> None:
    """Moves a prefilled ``DynamicCache`` into buffers of ``capacity`` positions (in place), so that
    decoding stops re-copying it at every step; any other cache is left as it is."""
    layers = getattr(cache, "layers", None)
    if DynamicLayer is None or not layers:
        return
    if any(type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.dim() != 4 for layer in layers):
        return  # sliding-window, quantised or shared layers keep their own update rules
    cache.layers = [_PreallocatedLayer(layer, capacity) for layer in layers]


def _last_logits_kwargs(model) -> dict:
    """Asks the prefill for the last position's logits only. The full [N, width, V] logits would
    cost a vocabulary-sized matmul per prompt token and most of the prefill's memory."""
    return keep_logits_kwargs(model, 1)


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
