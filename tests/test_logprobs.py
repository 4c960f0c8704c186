"""Response log-probabilities computed from the response positions only (``logits_to_keep``)."""

from __future__ import annotations

import torch

from lit_reason.models.logprobs import keep_logits_kwargs, position_ids_from_mask, response_logits, response_logprobs


def test_response_logits_match_the_full_forward_slice(tiny_model):
    # a left-padded prompt of P = 7 then L = 5 response tokens; the kept logits must be exactly the
    # full forward's rows P-1 .. P+L-2 (row t predicts response token t)
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    assert keep_logits_kwargs(tiny_model, 6) == {"logits_to_keep": 6}
    with torch.no_grad():
        kept = response_logits(tiny_model, ids, mask, 7)
        full = tiny_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    assert kept.shape == (3, 5, full.shape[-1])
    torch.testing.assert_close(kept, full[:, 6:-1].float(), rtol=0, atol=0)
    logp = response_logprobs(tiny_model, ids, mask, 7)
    naive = torch.log_softmax(full[:, 6:-1].float(), -1).gather(-1, ids[:, 7:, None]).squeeze(-1)
    torch.testing.assert_close(logp, naive, rtol=0, atol=1e-6)


def test_models_without_the_argument_get_every_position():
    class Plain(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            return None

    assert keep_logits_kwargs(Plain(), 4) == {}
