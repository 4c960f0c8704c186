"""The offline base module (dataset checks, items, implicit values, checkpoints), RFT and DPO.

Data: a small arithmetic dataset collected with the session's tiny model (a logit bias makes its
responses end), whose rewards are then relabelled by hand (the random tiny model is never right),
so that prompts with positives, negatives, both and neither all occur.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lit_reason.data.collect import collect
from lit_reason.methods import DPO, RFT
from lit_reason.methods.offline import OfflineRL, pack_states
from lit_reason.models.logprobs import response_logprobs
from lit_reason.tasks import get_task
from helpers import biased_copy

TASK = {"name": "arithmetic", "n_train": 24, "n_validation": 4, "n_test": 4}
pytestmark = pytest.mark.usefixtures("single_torch_thread")

# rewards by (prompt, sample): prompt 0 mixed, 1 all positive, 2 all negative, 3 mixed
LABELS = {0: [1, 0, 1], 1: [1, 1, 1], 2: [0, 0, 0], 3: [0, 1, 0]}


def relabel(folder: Path, labels: dict[int, list[int]]) -> None:
    """Rewrites the rewards of a dataset's rows (hand labels; the format is documented jsonl).

    A row labelled correct is also marked finished: a truncated response can never be correct.
    """
    for shard in folder.glob("shard-*.jsonl"):
        rows = [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
        for r in rows:
            r["reward"] = float(labels[r["prompt_index"]][r["sample_index"]])
            if r["reward"] > 0:
                r["finish"] = "eos"
        shard.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_model, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("offline") / "data"
    task = get_task(**TASK)
    collect((biased_copy(tiny_model, tiny_tokenizer, eos=3.0), tiny_tokenizer), task, out, samples=3, limit=4, max_new_tokens=16,
            chunk_size=2, progress=False, policy_name="tiny")
    relabel(out, LABELS)
    return out


class AllRows(RFT):
    """RFT on every row: the random tiny model is never right, and these tests are about the loop."""

    def select_items(self, rows):
        return rows


def make(cls, policy, data, **kwargs):
    return cls(policy=policy, task=TASK, data=str(data), batch_size=4, max_new_tokens=16, progress=False, **kwargs)


def test_rft_keeps_positive_responses_and_counts_prompts_without(tiny_policy_dir, dataset):
    module = make(RFT, tiny_policy_dir, dataset, dedupe=False)
    rows = module.load_rows()
    items = module.select_items(rows)
    # positives: prompt 0 samples 0,2; prompt 1 samples 0,1,2; prompt 3 sample 1 -> 6
    assert [(r["prompt_index"], r["sample_index"]) for r in items] == [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2), (3, 1)]
    assert module.data_stats["data/prompts_without_positive"] == 1.0  # prompt 2
    capped = make(RFT, tiny_policy_dir, dataset, dedupe=False, max_per_prompt=1).select_items(rows)
    assert sorted({r["prompt_index"] for r in capped}) == [0, 1, 3] and len(capped) == 3


def test_rft_dedupes_identical_responses(tiny_policy_dir, dataset):
    module = make(RFT, tiny_policy_dir, dataset)
    rows = module.load_rows()
    dup = dict(rows[0], sample_index=7)  # a second copy of prompt 0's first (positive) response
    items = module.select_items(rows + [dup])
    assert sum(r["prompt_index"] == 0 and r["response_ids"] == rows[0]["response_ids"] for r in items) == 1


def test_rft_without_any_positive_fails_clearly(tiny_policy_dir, dataset):
    module = make(RFT, tiny_policy_dir, dataset)
    rows = [dict(r, reward=0.0) for r in module.load_rows()]
    with pytest.raises(ValueError, match="no correct response"):
        module.select_items(rows)


def test_rft_loss_is_the_token_mean_nll_of_the_batch(tiny_policy_dir, dataset):
    module = make(RFT, tiny_policy_dir, dataset)
    rows = module.select_items(module.load_rows())[:3]
    loss = module.training_step(rows, 1)
    b = module.to_batch(rows)
    # independent: log-softmax of the logits at positions P-1 .. P+L-2, gathered at the response tokens
    logits = module.policy(input_ids=b.input_ids, attention_mask=b.attention_mask,
                           position_ids=(b.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    P = b.prompt_len
    lp = F.log_softmax(logits[:, P - 1 : -1].float(), -1).gather(-1, b.input_ids[:, P:, None]).squeeze(-1)
    expected = -(lp * b.response_mask).sum() / b.response_mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_dpo_pairs_and_counts(tiny_policy_dir, dataset):
    module = make(DPO, tiny_policy_dir, dataset, max_pairs=6)
    pairs = module.select_items(module.load_rows())
    # prompt 0: 2 pos x 1 neg = 2 pairs; prompt 3: 1 x 2 = 2; prompt 1 all positive, prompt 2 all negative
    assert len(pairs) == 4
    assert all(w["reward"] == 1.0 and lose["reward"] == 0.0 and w["prompt_index"] == lose["prompt_index"]
               for w, lose in pairs)
    assert module.data_stats["data/prompts_all_negative"] == 1.0
    assert module.data_stats["data/prompts_all_positive"] == 1.0


def test_dpo_on_an_all_negative_dataset_fails_clearly(tiny_policy_dir, dataset):
    module = make(DPO, tiny_policy_dir, dataset)
    rows = [dict(r, reward=0.0) for r in module.load_rows()]
    with pytest.raises(ValueError, match="all-negative"):
        module.select_items(rows)


def test_dpo_loss_matches_a_hand_computation(tiny_policy_dir, dataset):
    module = make(DPO, tiny_policy_dir, dataset, beta=0.5)
    with torch.no_grad():  # move the policy off the reference so the log-ratios are not all 0
        for p in module.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pairs = module.select_items(module.load_rows())[:2]
    loss = module.training_step(pairs, 1)
    ratios = []
    for rows in ([w for w, _ in pairs], [lose for _, lose in pairs]):
        b = module.to_batch(rows)
        logp = response_logprobs(module.policy, b.input_ids, b.attention_mask, b.prompt_len)
        ref = response_logprobs(module.reference.model, b.input_ids, b.attention_mask, b.prompt_len)
        ratios.append(((logp - ref) * b.response_mask).sum(-1))
    # L = mean_p -log sigmoid(beta * (r_w - r_l))
    expected = -F.logsigmoid(0.5 * (ratios[0] - ratios[1])).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("groups", [2, 3, 16])
def test_dpo_length_groups_change_neither_loss_nor_gradients(tiny_policy_dir, dataset, groups):
    """Scoring the batch in length-sorted groups (each padded to its own longest sequence) is the
    same computation as one padded pass; 16 groups for 8 sequences leaves empty groups out."""
    results = []
    for g in (1, groups):
        module = make(DPO, tiny_policy_dir, dataset, length_groups=g, dpo_positive_lambda=5.0)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in module.policy.parameters():
                p.add_(0.01 * torch.randn_like(p))
        pairs = module.select_items(module.load_rows())
        lengths = {len(x["response_ids"]) for pair in pairs for x in pair}
        assert len(lengths) > 1, "the pairs must differ in length for the groups to differ"
        loss = module.training_step(pairs, 1)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.policy.parameters()]))
    (loss1, grads1), (loss_g, grads_g) = results
    torch.testing.assert_close(loss_g, loss1, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_g, grads1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dpo_rejects_zero_length_groups(tiny_policy_dir, dataset):
    with pytest.raises(ValueError, match="length_groups"):
        make(DPO, tiny_policy_dir, dataset, length_groups=0)


def test_implicit_values_are_beta_times_the_summed_log_ratio(tiny_policy_dir, dataset):
    module = make(DPO, tiny_policy_dir, dataset, beta=0.2)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    row = module.load_rows()[0]
    prompt, partial = row["prompt_ids"], row["response_ids"][:3]
    got = module.state_values([prompt, prompt], [partial, []], [{}, {}])
    ids, mask, P, resp = pack_states([prompt], [partial], module.tokenizer.pad_token_id)
    lp = response_logprobs(module.policy, ids, mask, P)
    ref = response_logprobs(module.reference.model, ids, mask, P)
    torch.testing.assert_close(got[0], (0.2 * (lp - ref).sum()).detach(), rtol=1e-4, atol=1e-6)
    assert got[1] == 0.0  # the prompt itself: nothing taken yet
    assert got[0] != 0.0


def test_a_dataset_from_another_tokenizer_is_refused(tmp_path, tiny_policy_dir):
    from lit_reason.models.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer(vocab_size=320)
    other = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    out = tmp_path / "other"
    collect((biased_copy(other, tok, eos=3.0), tok), get_task(**TASK), out, samples=1, limit=2, max_new_tokens=8, progress=False)
    with pytest.raises(ValueError, match="another tokenizer"):
        make(RFT, tiny_policy_dir, out).load_rows()


def test_a_dataset_of_another_task_is_refused(tiny_policy_dir, dataset):
    module = RFT(policy=tiny_policy_dir, task={**TASK, "digits": 2}, data=str(dataset), progress=False)
    with pytest.raises(ValueError, match="another task"):
        module.load_rows()


def test_a_dataset_split_with_another_splitter_is_refused(tiny_policy_dir, dataset):
    module = make(RFT, tiny_policy_dir, dataset, splitter="double_newline")
    with pytest.raises(ValueError, match="split into steps"):
        module.load_rows()


def test_rows_without_steps_are_skipped_and_counted(tmp_path, tiny_policy_dir, dataset):
    import shutil

    copy_dir = tmp_path / "data"
    shutil.copytree(dataset, copy_dir)
    shard = sorted(copy_dir.glob("shard-*.jsonl"))[0]
    rows = [json.loads(line) for line in shard.read_text().splitlines()]
    rows[0].update(response_ids=[], step_ends=[], behaviour_logprobs=[], response="")
    shard.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = make(RFT, tiny_policy_dir, copy_dir)
    with pytest.warns(UserWarning, match="skipped 1 row"):
        kept = module.load_rows()
    assert len(kept) == 11 and module.data_stats["data/skipped_rows"] == 1.0


def test_missing_data_without_collect_names_the_folder(tmp_path, tiny_policy_dir):
    module = make(RFT, tiny_policy_dir, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere.*collect"):
        module.load_rows()


def test_bad_collect_settings_name_the_key(tiny_policy_dir):
    with pytest.raises(ValueError, match="temprature"):
        RFT(policy=tiny_policy_dir, task=TASK, collect={"samples": 2, "temprature": 0.7})
    with pytest.raises(ValueError, match="samples"):
        RFT(policy=tiny_policy_dir, task=TASK, collect={"limit": 2})


def test_fit_collects_on_first_use_then_reuses_and_checkpoints_the_data_path(tmp_path, tiny_policy_dir):
    data = tmp_path / "collected"

    def run(max_steps):
        module = AllRows(policy=tiny_policy_dir, task=TASK, data=str(data), batch_size=4, max_new_tokens=8,
                         progress=False, collect={"samples": 2, "limit": 4, "temperature": 1.0})
        trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             default_root_dir=tmp_path)
        trainer.fit(module)
        return module, trainer

    module, trainer = run(2)
    assert (data / "meta.json").exists() and len(module._items) == 8
    shards = {p.name: p.stat().st_mtime_ns for p in data.glob("shard-*")}
    run(1)  # a second run finds the complete dataset and does not re-collect it
    assert {p.name: p.stat().st_mtime_ns for p in data.glob("shard-*")} == shards
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    fresh = AllRows(policy=tiny_policy_dir, task=TASK, data=None, progress=False)
    fresh.on_load_checkpoint(ckpt)
    assert fresh.data_path == data


def test_offline_base_has_no_loss_of_its_own(tiny_policy_dir, dataset):
    module = make(OfflineRL, tiny_policy_dir, dataset)
    assert len(module.select_items(module.load_rows())) == 12


def test_eval_accuracy_every_n_epochs_evaluates_after_each_epoch(tmp_path, tiny_policy_dir, dataset):
    from lit_reason.callbacks import EvalAccuracy

    module = AllRows(policy=tiny_policy_dir, task=TASK, data=str(dataset), batch_size=6, max_new_tokens=8,
                     progress=False)
    evaluator = EvalAccuracy(limit=2, every_n_epochs=1, max_new_tokens=8)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                         callbacks=[evaluator])
    trainer.fit(module)
    # 12 rows / 6 per batch = 2 steps per epoch: start, after epoch 0 (step 2), after epoch 1 (step 4)
    assert [step for step, _ in evaluator.history] == [0, 2, 4]
    with pytest.raises(ValueError, match="every_n_epochs"):
        EvalAccuracy(every_n_epochs=0)
