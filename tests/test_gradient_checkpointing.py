"""``gradient_checkpointing: true`` on an RL module: the same gradients, activations recomputed."""

from __future__ import annotations

import pytest
import torch

from lit_reason.methods import GRPO
from lit_reason.models.logprobs import response_logprobs

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0}


def adapter_grads(tiny_policy_dir, checkpointing: bool, lora: dict | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same LoRA initialisation for both modules
    module = GRPO(policy=tiny_policy_dir, lora=lora, gradient_checkpointing=checkpointing, max_new_tokens=8)
    assert module.policy.is_gradient_checkpointing == checkpointing
    module.policy.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 13, 14, 15, 16, 17]])
    mask = torch.ones_like(ids)
    response_logprobs(module.policy, ids, mask, prompt_len=3).sum().backward()
    return {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [LORA, None], ids=["lora", "full"])
def test_checkpointing_gives_the_same_gradients(tiny_policy_dir, lora):
    plain = adapter_grads(tiny_policy_dir, False, lora)
    checkpointed = adapter_grads(tiny_policy_dir, True, lora)
    assert plain.keys() == checkpointed.keys() and plain
    # LoRA B starts at zero, so A's gradient is zero: check B's (and every full-model weight's) are not
    assert any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
