"""ValueModel.save / ValueModel.load: the value-model folder round-trips exactly and bad folders fail clearly."""

from __future__ import annotations

import pytest
import torch

from lit_reason.models.value import ValueModel


def _ids():
    return torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}])
def test_save_then_load_gives_the_same_values(tmp_path, lora):
    torch.manual_seed(0)
    tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    model = ValueModel.from_policy_name("embedded:tiny", tiny=tiny, lora=lora, bias=True)
    with torch.no_grad():
        model.head.bias.fill_(0.25)  # a non-default head, so a lost head would show
        if lora:  # a non-zero adapter, so an unmerged save would show
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.5)
    ids, mask = _ids()
    expected = model(ids, mask)
    model.save(tmp_path / "v")
    loaded = ValueModel.load(tmp_path / "v")
    torch.testing.assert_close(loaded(ids, mask), expected, rtol=1e-5, atol=1e-5)
    assert loaded.head.bias is not None


def test_values_of_reads_the_last_token():
    torch.manual_seed(0)
    model = ValueModel.from_policy_name("embedded:tiny", tiny={"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                                               "intermediate_size": 64})
    ids, mask = _ids()
    full = model(ids, mask)
    got = model.values_of([[5, 6, 7, 8], [9, 10, 11]], pad_token_id=0, batch_size=1)
    torch.testing.assert_close(got, torch.stack([full[0, 3], full[1, 2]]))


def test_a_policy_folder_is_not_a_value_model(tmp_path, tiny_policy_dir):
    with pytest.raises(FileNotFoundError, match="value_head.json"):
        ValueModel.load(tiny_policy_dir)


def test_values_of_reads_a_terminal_state_before_its_eos():
    torch.manual_seed(0)
    model = ValueModel.from_policy_name("embedded:tiny", tiny={"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                                               "intermediate_size": 64})
    eos = 3
    got = model.values_of([[5, 6, eos], [5, 6], [eos]], pad_token_id=0, eos_token_id=eos)
    plain = model.values_of([[5, 6], [5, 6], [eos]], pad_token_id=0)
    torch.testing.assert_close(got, plain)  # [5, 6, EOS] is read at 6; a lone EOS has nothing before it
