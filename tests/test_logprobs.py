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


def test_length_groups_give_the_same_logprobs_and_gradients(tiny_model):
    """Rows sorted by length and scored in groups, each cut to its own width, equal one padded pass
    on every real response token; gradients too. Prompt lengths 3-7 (left-padded to 7), response
    lengths 1-5 (right-padded to 5); 5 groups of 6 rows leaves one group of two."""
    import copy

    model = copy.deepcopy(tiny_model).train()
    torch.manual_seed(0)
    P, L = 7, 5
    ids = torch.randint(5, 100, (6, P + L))
    mask = torch.zeros_like(ids)
    for b, (p, r) in enumerate([(7, 5), (3, 1), (5, 2), (4, 5), (6, 3), (3, 4)]):
        mask[b, P - p : P + r] = 1
    response = mask[:, P:].bool()
    grads = []
    for groups in (1, 2, 5, 50):
        model.zero_grad()
        lp = response_logprobs(model, ids, mask, P, temperature=0.7, length_groups=groups)
        assert lp.shape == (6, L)
        (lp * response).sum().backward()
        grads.append(([p.grad.clone() for p in model.parameters()], lp.detach()[response]))
    base_grads, base_lp = grads[0]
    for g, lp in grads[1:]:
        torch.testing.assert_close(lp, base_lp, rtol=0, atol=1e-5)
        for a, b in zip(g, base_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
