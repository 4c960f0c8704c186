"""Log-probability utilities shared by every method (policy, reference, implicit values)."""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded prompt sees the same RoPE angles.

    Args:
        attention_mask: [B, T] 1 on real tokens.

    Returns:
        [B, T] long positions (0 on padding).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits that predict each response token.

    Args:
        model: A causal LM returning ``.logits``.
        input_ids: [B, P+L] prompt (left-padded) then response (right-padded).
        attention_mask: [B, P+L].
        prompt_len: P.

    Returns:
        [B, L, V] float logits; row t predicts response token t.
    """
    response_len = input_ids.shape[1] - prompt_len
    # only the L+1 last positions' logits: the prompt's [B, P, V] logits would cost a vocabulary-sized
    # matmul per prompt token and, with a 49k vocabulary and chat prompts, most of a step's memory;
    # use_cache=False: scoring never continues from here, and building the KV cache costs ~5% of a
    # forward (README "Side by side with TRL")
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False, **keep_logits_kwargs(model, response_len + 1))
    return out.logits[:, -(response_len + 1) : -1].float()


@functools.lru_cache(maxsize=None)
def _keep_logits_argument(forward_owner: type) -> str | None:
    params = inspect.signature(forward_owner.forward).parameters
    return next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in params), None)


def keep_logits_kwargs(model, n: int) -> dict:
    """Forward kwargs that compute the logits of the last ``n`` positions only.

    ``logits_to_keep`` in recent transformers (``num_logits_to_keep`` in 4.45-4.49); an empty dict
    for a model without it, which then returns every position (callers slice from the end).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = _keep_logits_argument(type(base))
    return {name: n} if name else {}


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens].

    Args:
        logits: [B, L, V].
        tokens: [B, L] long.
        temperature: Sampling temperature the tokens were drawn with (VinePPO divides by it).

    Returns:
        [B, L] log-probabilities.
    """
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, temperature: float = 1.0,
    length_groups: int = 1,
) -> torch.Tensor:
    """Per-token log pi(y_t | x, y_<t) of the response part.

    Args:
        model: A causal LM.
        input_ids: [B, P+L].
        attention_mask: [B, P+L].
        prompt_len: P.
        temperature: Divides the logits first (1.0 = the model's own distribution).
        length_groups: Score the rows in this many forward passes, sorted by length, each cut to its
            own longest prompt and response: the same values with fewer pad tokens computed (a
            batch's lengths vary; one pass pads every row to the longest).

    Returns:
        [B, L] log-probabilities (values on padded positions are meaningless; mask them).
    """
    if length_groups > 1 and input_ids.shape[0] > 1:
        return _grouped_response_logprobs(model, input_ids, attention_mask, prompt_len, temperature, length_groups)
    logits = response_logits(model, input_ids, attention_mask, prompt_len)
    return gather_logprobs(logits, input_ids[:, prompt_len:], temperature)


def _grouped_response_logprobs(model, input_ids, attention_mask, prompt_len: int, temperature: float,
                               groups: int) -> torch.Tensor:
    """:func:`response_logprobs` in ``groups`` length-sorted passes ([B, L]; 0 past each row's response)."""
    B, L = input_ids.shape[0], input_ids.shape[1] - prompt_len
    prompt_real = attention_mask[:, :prompt_len].sum(-1)
    response_real = attention_mask[:, prompt_len:].sum(-1)
    order = (prompt_real + response_real).argsort(stable=True)
    parts, rows = [], []
    for idx in order.tensor_split(min(groups, B)):
        p, r = max(int(prompt_real[idx].max()), 1), max(int(response_real[idx].max()), 1)
        cut = slice(prompt_len - p, prompt_len + r)  # prompts are left-padded, responses right-padded
        lp = response_logprobs(model, input_ids[idx, cut], attention_mask[idx, cut], p, temperature)
        parts.append(F.pad(lp, (0, L - r)))
        rows.append(idx)
    inverse = torch.empty_like(order)
    inverse[torch.cat(rows)] = torch.arange(B, device=order.device)
    return torch.cat(parts)[inverse]


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi || pi_ref) over the full vocabulary at each position.

    Args:
        logits: [B, L, V] policy logits.
        ref_logits: [B, L, V] reference logits.

    Returns:
        [B, L] KL per position.
    """
    logp = torch.log_softmax(logits.float(), -1)
    ref = torch.log_softmax(ref_logits.float(), -1)
    return F.kl_div(ref, logp, log_target=True, reduction="none").sum(-1)


def pack_states(prompt_ids, partial_ids, pad_token_id: int, min_width: int = 0):
    """Left-pads prompts and right-pads continuations (partial responses, steps) into one batch,
    the layout :func:`response_logprobs` reads.

    Args:
        prompt_ids: N prefix token lists (non-empty).
        partial_ids: N continuation token lists (may be empty).
        pad_token_id: Pad id.
        min_width: Smallest continuation width L (1 keeps a batch of empty continuations scorable).

    Returns:
        ``(input_ids [N, P+L], attention_mask [N, P+L], P, response_mask [N, L])``.
    """
    P = max(len(p) for p in prompt_ids)
    L = max(max((len(q) for q in partial_ids), default=0), min_width)
    n = len(prompt_ids)
    ids = torch.full((n, P + L), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, P + L), dtype=torch.long)
    resp = torch.zeros((n, L))
    for i, (p, q) in enumerate(zip(prompt_ids, partial_ids)):
        ids[i, P - len(p) : P] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, P - len(p) : P] = 1
        if q:
            ids[i, P : P + len(q)] = torch.as_tensor(list(q), dtype=torch.long)
            mask[i, P : P + len(q)] = 1
            resp[i, : len(q)] = 1
    return ids, mask, P, resp
