"""Can a value model of the embedded policy's size pick the correct answer among its samples?

Value-guided search (OREO's beam search) beats greedy decoding only when the value model ranks
the *samples of one prompt* correctly: telling prompt difficulty apart is not enough. This
benchmark measures exactly that, on held-out prompts of a collected dataset (``--data``; collected
on first use: ``--policy``, default ``embedded:arithmetic``, the first ``--prompts`` training
prompts x 8 samples at T 0.7, the offline recipes' sampling; the last ``--heldout`` prompts are held out):

* ``best-of-K`` (``--samples``, default 8): accuracy when each held-out prompt keeps its highest-valued sample
  (:func:`lit_reason.metrics.best_of_k_accuracy`; the value of the state before EOS, as beam
  search reads it);
* ``pairs (outcome)``: within-prompt pairwise accuracy, correct vs incorrect sample
  (:func:`lit_reason.metrics.pairwise_outcome_accuracy`, chance 0.5);
* ``pairs (steps)``: the same over step-end states against the task's exact process labels
  (:meth:`ArithmeticTask.step_correctness`: is the prefix error-free so far?), pairs within a prompt.

Scorers: value models trained here from the start policy's trunk (zero-initialised head with bias,
AdamW betas 0.9/0.95, gradient clip 1) on the other prompts' rows with

* ``outcome``: MSE of every response state's value onto the sample's 0/1 outcome (the Monte Carlo
  target; OREO's critic target while the policy equals the reference);
* ``process``: MSE of each step-end state's value onto its exact process label, an oracle no
  method in docs/ has (an upper bound on what the architecture learns from this much data);

any saved value model (``--value DIR``, e.g. one exported by ``callbacks/export_value_model.yaml``),
and references that need no value model: random choice (the mean outcome), the policy's own
likelihood (summed behaviour log-probs at T 0.7), majority vote over answers, and pass@8 (a
perfect selector).

A real model (``--policy smollm2:135m-instruct``) takes its task config (``--task``, e.g. chat prompts),
a held-out split (``--split validation``, every prompt held out), training rows from another collection
(``--train-data``, e.g. the OREO recipe's) and LoRA value models (``--lora``).

Run:  python benchmarks/value_selection.py [--policy embedded:arithmetic] [--prompts 4096] [--heldout 128]
      [--train outcome process] [--epochs 3 4] [--lr 3e-4 5e-4] [--value runs/bench/oreo_beam/value]
      [--task YAML] [--split S] [--samples K] [--max-new-tokens N] [--train-data DIR] [--lora YAML]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import yaml

from lit_reason.data.collect import collect
from lit_reason.data.selection import group_by_prompt
from lit_reason.data.trajectories import TrajectoryDataset
from lit_reason.evaluation import majority_answer
from lit_reason.metrics import best_of_k_accuracy, pairwise_outcome_accuracy
from lit_reason.models.loading import load_tokenizer
from lit_reason.models.value import ValueModel
from lit_reason.tasks import get_task

POLICY = "embedded:arithmetic"


def step_texts(row: dict, tokenizer) -> list[str]:
    """The response's steps as text (spans of ``step_ends``)."""
    starts = [0] + [e + 1 for e in row["step_ends"][:-1]]
    return [tokenizer.decode(row["response_ids"][s : e + 1], skip_special_tokens=True)
            for s, e in zip(starts, row["step_ends"])]


def step_states(row: dict) -> list[int]:
    """Response lengths of the states after each step (the last: the state before EOS)."""
    ends = row["step_ends"]
    return [e + 1 for e in ends[:-1]] + [ends[-1] if row["finish"] == "eos" else ends[-1] + 1]


def label_steps(rows: list[dict], task, split: str, tokenizer) -> list[dict]:
    """Adds each row's exact process labels (``process``: one per step) in place; returns ``rows``."""
    examples = task.examples(split)
    for r in rows:
        r["process"] = task.step_correctness(examples[r["prompt_index"]], step_texts(r, tokenizer))
    return rows


def train_value_model(policy: str, rows: list[dict], targets: str, epochs: int, lr: float, batch_size: int,
                      seed: int, pad_token_id: int, lora: dict | None = None) -> ValueModel:
    """A value model from the policy's trunk, regressed onto ``outcome`` or ``process`` labels.

    With ``lora`` the trunk is frozen and only its adapter and the head train (a real model's trunk).
    """
    torch.manual_seed(seed)
    model = ValueModel.from_policy_name(policy, bias=True, zero_init=True, lora=lora)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rows = list(rows)
    model.train()
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(rows)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            b = TrajectoryDataset.to_batch(chunk, pad_token_id)
            values = model.response_values(b.input_ids, b.attention_mask, b.prompt_len)  # [B, L]: V(s_t)
            if targets == "outcome":
                mask = b.response_mask
                loss = (((values - b.rewards.float()[:, None]) ** 2) * mask).sum() / mask.sum()
            else:
                rows_idx, pos, labels = [], [], []
                for i, r in enumerate(chunk):
                    for t, label in zip(step_states(r), r["process"]):
                        if t < values.shape[1]:  # a truncated response has no state after its last token
                            rows_idx.append(i), pos.append(t), labels.append(float(label))
                loss = ((values[rows_idx, pos] - torch.tensor(labels)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    return model.eval()


def score(model: ValueModel, rows: list[dict], pad_token_id: int, batch_size: int = 64) -> dict:
    """best-of-K / outcome pairs / step pairs of one value model on the held-out rows.

    One forward pass per row reads every state's value at once: causal attention makes the value
    at the last token of a prefix the same as that of the prefix scored alone (right padding only),
    and scoring each step's prefix separately cost a real model's trunk several passes per row.
    """
    values = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            seqs = [r["prompt_ids"] + r["response_ids"] for r in chunk]
            width = max(len(q) for q in seqs)
            ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, q in enumerate(seqs):
                ids[i, : len(q)], mask[i, : len(q)] = torch.as_tensor(q), 1
            v = model(ids, mask).float()  # [b, width]: the value of the prefix ending at each position
            # state s_t (t response tokens) ends at position len(prompt) - 1 + t
            values += [v[i, len(r["prompt_ids"]) - 1 : len(q)] for i, (r, q) in enumerate(zip(chunk, seqs))]
    groups = [r["prompt_index"] for r in rows]
    outcomes = [float(r["reward"] > 0.5) for r in rows]
    finals = torch.stack([v[step_states(r)[-1]] for v, r in zip(values, rows)])
    out = {"best-of-k": best_of_k_accuracy(finals, outcomes, groups)[0],
           "pairs (outcome)": pairwise_outcome_accuracy(finals, outcomes, groups)[0]}
    states, labels, state_groups = [], [], []
    for v, r in zip(values, rows):
        for t, label in zip(step_states(r), r["process"]):
            states.append(v[t])
            labels.append(float(label))
            state_groups.append(r["prompt_index"])
    out["pairs (steps)"] = pairwise_outcome_accuracy(torch.stack(states), labels, state_groups)[0]
    return out


def majority_vote(groups: list[list[dict]], task) -> float:
    """Accuracy of each prompt's most frequent answer (:func:`lit_reason.evaluation.majority_answer`)."""
    correct = 0.0
    for group in groups:
        answers = [task.extract_answer(r["response"]) for r in group]
        top = majority_answer(answers)
        if top is not None:
            correct += next(r["reward"] for r, a in zip(group, answers) if a == top)
    return correct / len(groups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", default=POLICY, help="the sampling policy; value models start from its trunk")
    ap.add_argument("--task", type=yaml.safe_load, default={"name": "arithmetic"},
                    help="arithmetic task config as YAML, e.g. '{name: arithmetic, num_operands: 3, prompt_format: chat}'")
    ap.add_argument("--split", default="train", help="task split the prompts of --data come from")
    ap.add_argument("--data", default=None, help="collected dataset (default runs/data/arithmetic-t0.7-k8-<prompts>)")
    ap.add_argument("--prompts", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (best-of-K reads K of them)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="collection's response length limit")
    ap.add_argument("--heldout", type=int, default=128, help="the last N prompts of --data are scored")
    ap.add_argument("--train-data", default=None,
                    help="train value models on every row of this dataset instead of --data's other prompts "
                         "(e.g. an offline recipe's collection, so that --data can be a held-out split)")
    ap.add_argument("--lora", type=yaml.safe_load, default=None,
                    help="train value models as LoRA adapters on a frozen trunk, e.g. '{r: 8, target_modules: all-linear}'")
    ap.add_argument("--train", nargs="*", default=["outcome", "process"], choices=["outcome", "process"])
    ap.add_argument("--epochs", type=int, nargs="*", default=[3, 4], help="one per --train entry")
    ap.add_argument("--lr", type=float, nargs="*", default=[3e-4, 5e-4], help="one per --train entry")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--value", nargs="*", default=[], help="saved value model folders to score too")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not len(args.epochs) == len(args.lr) == len(args.train):
        ap.error(f"--epochs {args.epochs} and --lr {args.lr} need one entry per --train entry {args.train}")
    if args.policy != POLICY and args.data is None:
        ap.error(f"--policy {args.policy} needs its own --data folder (the default one holds {POLICY}'s samples)")
    if not isinstance(args.task, dict) or args.task.get("name") != "arithmetic":
        # the step-pair column needs exact process labels, which only the arithmetic task has
        ap.error(f"--task {args.task!r}: give an arithmetic task config, e.g. '{{name: arithmetic, num_operands: 3}}'")

    task = get_task(**args.task)
    tokenizer = load_tokenizer(args.policy)
    data = Path(args.data or f"runs/data/arithmetic-t0.7-k8-{args.prompts}")
    collect(args.policy, task, data, samples=args.samples, split=args.split, limit=args.prompts, temperature=0.7,
            max_new_tokens=args.max_new_tokens, seed=args.seed)
    dataset = TrajectoryDataset(data)  # collect() refused a folder holding another policy, task or tokenizer
    label_steps(dataset.rows, task, dataset.meta.get("split", "train"), tokenizer)
    cut = dataset.num_prompts - args.heldout
    heldout = [r for r in dataset.rows if r["prompt_index"] >= cut]
    if args.train_data:
        train_set = TrajectoryDataset(args.train_data)
        if train_set.meta.get("task") != dataset.meta.get("task"):
            ap.error(f"--train-data {args.train_data} holds task {train_set.meta.get('task')!r}, "
                     f"--data {data} holds {dataset.meta.get('task')!r}")
        train = label_steps(train_set.rows, task, train_set.meta.get("split", "train"), tokenizer)
    else:
        train = [r for r in dataset.rows if r["prompt_index"] < cut]
    if args.train and not train:
        ap.error(f"no training rows: --heldout {args.heldout} holds out all {dataset.num_prompts} prompts of "
                 f"{data}; give --train-data or --train with no entries")
    pad = tokenizer.pad_token_id
    groups = list(group_by_prompt(heldout).values())
    sizes = [len(g) for g in groups]

    table = []
    table.append(("random sample (mean outcome)", sum(r["reward"] for r in heldout) / len(heldout), "", "", ""))
    lik = torch.tensor([sum(r["behaviour_logprobs"]) for r in heldout])
    table.append(("policy likelihood (sum log-prob)",
                  best_of_k_accuracy(lik, [float(r["reward"] > 0.5) for r in heldout],
                                     [r["prompt_index"] for r in heldout])[0], "", "", ""))
    table.append(("majority vote", majority_vote(groups, task), "", "", ""))
    table.append((f"pass@{max(sizes)} (perfect selector)",
                  sum(any(r["reward"] > 0.5 for r in g) for g in groups) / len(groups), "", "", ""))
    for targets, epochs, lr in zip(args.train, args.epochs, args.lr):
        start = time.perf_counter()
        model = train_value_model(args.policy, train, targets, epochs, lr, args.batch_size, args.seed, pad, args.lora)
        seconds = time.perf_counter() - start
        s = score(model, heldout, pad)
        table.append((f"value model, {targets} labels ({epochs} ep, lr {lr:g})", s["best-of-k"],
                      s["pairs (outcome)"], s["pairs (steps)"], f"{seconds:.0f}"))
    for folder in args.value:
        s = score(ValueModel.load(folder).eval(), heldout, pad)
        table.append((f"saved value model {folder}", s["best-of-k"], s["pairs (outcome)"], s["pairs (steps)"], ""))

    source = args.train_data or f"{cut} prompts of {data}"
    print(f"\n{len(groups)} held-out prompts x {min(sizes)}-{max(sizes)} samples ({data}); "
          f"{len(train)} training rows ({source})\n")
    print(f"| scorer | best-of-{max(sizes)} accuracy | pairs (outcome) | pairs (steps) | train s |")
    print("| --- | --- | --- | --- | --- |")
    for name, *cols in table:
        print(f"| {name} | " + " | ".join(c if isinstance(c, str) else f"{c:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
