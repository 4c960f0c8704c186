"""Rollout speed: the RolloutEngine against transformers' ``model.generate`` on the same work.

Both sample the same prompts with the same settings (multinomial sampling at ``--temperature``,
``top_p = 1``, no top-k, ``--max-new-tokens``, stop at EOS) in two modes:

* ``sample``: one continuation of each of ``batch`` prompts (``engine.sample(prompts, 1)`` against
  ``generate`` on the batch);
* ``mc K=8``: K Monte Carlo continuations of each of ``batch / K`` shared prefixes
  (``engine.continue_from(prefixes, K)``, which prefills each prefix once, against ``generate``
  with ``num_return_sequences=K``, which prefills it K times).

Prompts are exactly ``--prompt-tokens`` long with no padding: GSM8K test questions through the
model's chat template (the user turn holds consecutive questions, cut so the templated prompt has
the length; a model without a template gets the plain question text cut to the length).

Runs alternate (engine, generate, engine, generate ...) so that load on a shared machine hits both;
each run is timed with ``time.perf_counter`` after one small warm-up call of each. Throughput
counts generated tokens up to and including EOS (a row's padding after EOS is not counted).

FLOPs: a token through the model costs 2 x (non-embedding parameters + vocab x hidden) matmul FLOPs
(the LM head is real work even when tied to the embedding); attention over the context (under 5%
here) is left out. ``% all`` relates the work the task needs (every prefix prefilled once, plus
the generated tokens; the same count for both methods, so redundant prefills by ``generate`` are
not credited) to the fp32 matmul rate measured in this script before every repetition;
``% gen`` counts the generated tokens only.

Run:  python benchmarks/rollout_speed.py [--policy smollm2:135m-instruct embedded:arithmetic]
          [--batch 32 64] [--k 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/rollout_speed.py` from a checkout without an install
    sys.path.insert(0, str(REPO))
from benchmarks.mc_rollouts import forward_flops_per_token, matmul_gflops  # noqa: E402
from lit_reason.models.loading import load_policy  # noqa: E402
from lit_reason.rollout.sampler import RolloutEngine  # noqa: E402

_MARK = "\u2063split\u2063"


def gsm8k_questions(data: str | None) -> list[str]:
    """GSM8K test questions from ``--data``, ``$LIT_REASON_DATA/gsm8k`` or ``../shared/data/gsm8k``."""
    root = Path(data) if data else Path(os.environ.get("LIT_REASON_DATA", REPO.parent / "shared" / "data")) / "gsm8k"
    path = root / "test.jsonl" if root.is_dir() else root
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K test file {path} not found: pass --data FOLDER (holding test.jsonl)")
    return [json.loads(line)["question"] for line in path.read_text().splitlines() if line.strip()]


def fixed_length_prompts(tok, questions: list[str], n: int, length: int) -> list[list[int]]:
    """``n`` prompts of exactly ``length`` tokens: chat template head + question tokens + tail."""
    head: list[int] = []
    tail: list[int] = []
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=True)
        head_text, tail_text = text.split(_MARK)
        head = tok(head_text, add_special_tokens=False)["input_ids"]
        tail = tok(tail_text, add_special_tokens=False)["input_ids"]
    room = length - len(head) - len(tail)
    if room < 1:
        raise ValueError(f"--prompt-tokens {length} leaves no room for a question after the chat template")
    prompts = []
    for i in range(n):
        body: list[int] = []
        j = i
        while len(body) < room:  # consecutive questions until the user turn is long enough
            body += tok(questions[j % len(questions)] + "\n\n", add_special_tokens=False)["input_ids"]
            j += 1
        prompts.append(head + body[:room] + tail)
    return prompts


def count_generated(rows: torch.Tensor, eos: int) -> int:
    """Tokens of ``generate``'s new columns [B, T] up to and including each row's first EOS."""
    hit = rows == eos
    first = torch.where(hit.any(-1), hit.float().argmax(-1) + 1, torch.full_like(rows[:, 0], rows.shape[1]))
    return int(first.sum())


def run_generate(model, tok, prompts, k, max_new, temperature, seed) -> int:
    """``model.generate`` with the engine's settings; returns the generated token count."""
    ids = torch.tensor(prompts)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=temperature > 0, temperature=temperature or None,
        top_p=1.0, top_k=0, max_new_tokens=max_new, num_return_sequences=k,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    return count_generated(out[:, ids.shape[1]:], tok.eos_token_id)


def run_engine(engine, prompts, k) -> int:
    before = engine.generated_tokens
    engine.continue_from(prompts, k) if k > 1 else engine.sample(prompts, 1)
    return engine.generated_tokens - before


def bench_policy(name: str, args, questions, rates: list[float]) -> list[dict]:
    model, tok = load_policy(name)
    model.eval()
    per_token = forward_flops_per_token(model)
    prompts = fixed_length_prompts(tok, questions, max(args.batch), args.prompt_tokens)
    engine = RolloutEngine(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           batch_size=max(args.batch), seed=args.seed)
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{per_token / 1e6:.1f} MFLOP per token", flush=True)
    # warm-up: first calls pay one-off allocation and dispatch costs
    run_engine(engine, prompts[:2], 1)
    run_generate(model, tok, prompts[:2], 1, 4, args.temperature, args.seed)
    cases = []
    for batch in args.batch:
        cases.append((batch, "sample", prompts[:batch], 1))
        cases.append((batch, f"mc K={args.k}", prompts[: batch // args.k], args.k))
    totals = {(b, mode, m): [0.0, 0] for b, mode, _, _ in cases for m in ("engine", "generate")}
    for rep in range(args.repeats):
        rates.append(matmul_gflops())
        for batch, mode, ps, k in cases:
            for method in ("engine", "generate"):
                engine.reseed(args.seed + rep)
                t = time.perf_counter()
                if method == "engine":
                    n = run_engine(engine, ps, k)
                else:
                    n = run_generate(model, tok, ps, k, args.max_new_tokens, args.temperature, args.seed + rep)
                seconds = time.perf_counter() - t
                totals[(batch, mode, method)][0] += seconds
                totals[(batch, mode, method)][1] += n
                print(f"  rep {rep} batch {batch} {mode} {method}: {n} tokens in {seconds:.2f} s", flush=True)
    rows = []
    for batch, mode, ps, k in cases:
        for method in ("engine", "generate"):
            seconds, generated = totals[(batch, mode, method)]
            prefill = len(ps) * args.prompt_tokens * args.repeats
            rows.append(dict(policy=name, batch=batch, mode=mode, method=method, seconds=seconds / args.repeats,
                             tok_s=generated / seconds, flops_all=per_token * (prefill + generated) / seconds,
                             flops_gen=per_token * generated / seconds))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", nargs="+", default=["smollm2:135m-instruct", "embedded:arithmetic"])
    p.add_argument("--batch", type=int, nargs="+", default=[32, 64], help="sequences decoded together")
    p.add_argument("--k", type=int, default=8, help="Monte Carlo continuations per shared prefix")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="GSM8K folder or test.jsonl")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(b % args.k for b in args.batch):
        raise ValueError(f"every --batch must be a multiple of --k {args.k}")

    questions = gsm8k_questions(args.data)
    rows, rates = [], []
    for name in args.policy:
        rows += bench_policy(name, args, questions, rates)
    rate = sum(rates) / len(rates)
    print(f"\n{args.prompt_tokens}-token prompts, {args.max_new_tokens} new tokens, temperature {args.temperature}, "
          f"top_p 1, {args.repeats} repetitions; torch threads {torch.get_num_threads()}; measured fp32 matmul rate "
          f"{rate:.1f} GFLOP/s (mean of {len(rates)}, range {min(rates):.0f}-{max(rates):.0f}; 1024^3 matmul)")
    header = (f"{'policy':<24}{'batch':>6}  {'mode':<9}{'method':<10}{'s / run':>9}{'gen tok/s':>11}"
              f"{'vs generate':>13}{'GFLOP/s':>9}{'% all':>8}{'% gen':>8}")
    print(header)
    print("-" * len(header))
    by_key = {(r["policy"], r["batch"], r["mode"], r["method"]): r for r in rows}
    for r in rows:
        ref = by_key[(r["policy"], r["batch"], r["mode"], "generate")]
        print(f"{r['policy']:<24}{r['batch']:>6}  {r['mode']:<9}{r['method']:<10}{r['seconds']:>9.2f}{r['tok_s']:>11.0f}"
              f"{r['tok_s'] / ref['tok_s']:>12.2f}x{r['flops_all'] / 1e9:>9.1f}{100 * r['flops_all'] / 1e9 / rate:>7.1f}%"
              f"{100 * r['flops_gen'] / 1e9 / rate:>7.1f}%")


if __name__ == "__main__":
    main()
