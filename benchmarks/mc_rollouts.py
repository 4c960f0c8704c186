"""Monte Carlo value estimation: each prefix encoded once vs re-encoded for every continuation.

VinePPO's cost is the K continuations from every step-boundary state. ``continue_from`` prefills a
prefix once and repeats its KV cache K times; the naive way re-encodes the prefix for each of the
K continuations. This script measures both on the same states and the same number of samples,
and relates the achieved throughput to this machine's matmul rate.

Run:  python benchmarks/mc_rollouts.py [--policy embedded:arithmetic] [--prompts 32] [--k 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from lit_reason.models.loading import load_policy
from lit_reason.rollout.monte_carlo import step_states
from lit_reason.rollout.sampler import RolloutEngine
from lit_reason.rollout.trajectories import rollout
from lit_reason.steps import StepSplitter
from lit_reason.tasks import get_task


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
    """Measured float32 matmul rate of this machine (GFLOP/s) with torch's current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def forward_flops_per_token(model) -> float:
    """2 x non-embedding parameters: the matmul FLOPs of one token through the model (attention
    scores over the short contexts here add a few percent and are left out)."""
    emb = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    # tied LM head: its matmul is real work even though its weights are the embedding's
    return 2.0 * (total - emb + model.config.vocab_size * model.config.hidden_size)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="embedded:arithmetic")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="arithmetic", help="arithmetic, or gsm8k for longer prompts (needs --data or $LIT_REASON_DATA)")
    p.add_argument("--data", default=None)
    args = p.parse_args()

    model, tok = load_policy(args.policy)
    model.eval()
    task = get_task(args.task, **({"path": args.data} if args.data else {}))
    splitter = StepSplitter(answer_prefix=task.answer_prefix)
    engine = RolloutEngine(model, tok, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    batch = rollout(engine, task, splitter, task.examples("validation" if args.task == "arithmetic" else "test")[: args.prompts], k=1)
    states = step_states(batch)
    prefixes = [s[2] + s[3] for s in states]
    prefix_tokens = sum(len(x) for x in prefixes)

    results = []
    for name, run in (
        ("shared prefix (continue_from)", lambda: engine.continue_from(prefixes, args.k)),
        ("re-encoded per continuation", lambda: engine.sample([x for x in prefixes for _ in range(args.k)], 1)),
    ):
        engine.reseed(args.seed)
        before = engine.generated_tokens
        gens, seconds = timed(run)
        generated = engine.generated_tokens - before
        prefill = prefix_tokens * (1 if name.startswith("shared") else args.k)
        results.append((name, seconds, generated, prefill, len(gens)))

    rate = matmul_gflops()
    per_token = forward_flops_per_token(model)
    base = results[1][1]
    print(f"task {args.task}, policy {args.policy}: {len(states)} step-boundary states from {args.prompts} prompts, K={args.k}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, torch threads {torch.get_num_threads()}")
    print(f"measured float32 matmul rate: {rate:.1f} GFLOP/s (1024^3 matmul)")
    header = f"{'method':<32}{'seconds':>9}{'speed-up':>10}{'gen tok/s':>11}{'prefill tok':>13}{'GFLOP/s':>9}{'% of matmul':>13}"
    print(header)
    print("-" * len(header))
    for name, seconds, generated, prefill, n in results:
        gflops = per_token * (generated + prefill) / seconds / 1e9
        print(f"{name:<32}{seconds:>9.2f}{base / seconds:>9.2f}x{generated / seconds:>11.0f}{prefill:>13d}"
              f"{gflops:>9.2f}{100 * gflops / rate:>12.1f}%")


if __name__ == "__main__":
    main()
