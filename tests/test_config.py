import pytest
import torch

from glassgpt import GPT, GPTConfig, get_preset
from glassgpt.config import PRESETS

EXPECTED_PARAMETERS = {
    "tinygpt": 2_453,
    "nano": 5_846_528,
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "verdict-162m": 162_419_712,
    "verdict-demo-70m": 70_500_352,  # 2 x 50257 x 512 (untied) + 256 x 512 + 6 x 3,150,848 + 1,024
}


@pytest.mark.parametrize("name", list(EXPECTED_PARAMETERS))
def test_preset_parameter_counts(name):
    # Built on the meta device: counts without allocating (gpt2-xl would be 6 GB).
    with torch.device("meta"):
        model = GPT.from_preset(name)
    assert model.num_parameters() == EXPECTED_PARAMETERS[name]
    rows = dict(model.parameter_breakdown())
    assert rows["total"] == EXPECTED_PARAMETERS[name]
    assert sum(n for label, n in model.parameter_breakdown() if label != "total") == rows["total"]


def test_every_preset_is_counted():
    assert set(PRESETS) == set(EXPECTED_PARAMETERS)


def test_tinygpt_breakdown_matches_hand_count():
    rows = dict(GPT.from_preset("tinygpt").parameter_breakdown())
    assert rows["token embedding"] == 5 * 16
    assert rows["position embedding"] == 4 * 16
    assert rows["block 0 attention"] == 3 * (16 * 16 + 16) + 16 * 16 + 16
    assert rows["block 0 feed-forward"] == 16 * 32 + 32 + 32 * 16 + 16
    assert rows["block 0 norms"] == 4 * 16
    assert rows["output head"] == 16 * 5 + 5


def test_verdict_preset_is_gpt2_small_with_context_256_untied():
    config = get_preset("verdict-162m")
    assert (config.emb_dim, config.n_heads, config.n_layers, config.context_length) == (768, 12, 12, 256)
    assert not config.tie_weights and not config.qkv_bias and config.attn_out_bias
    assert config.drop_rate == 0.1


def test_overrides_and_round_trip():
    config = get_preset("gpt2", context_length=256, n_layers=2)
    assert config.context_length == 256 and config.n_layers == 2
    assert GPTConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("bad", [
    dict(emb_dim=10, n_heads=3),
    dict(vocab_size=0),
    dict(drop_rate=1.5),
    dict(norm_placement="middle"),
    dict(activation="swish"),
])
def test_invalid_config_is_a_clear_error(bad):
    with pytest.raises(ValueError):
        GPTConfig(**bad)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="gpt2-medium"):
        get_preset("gpt5")


def test_unknown_field_in_saved_config():
    with pytest.raises(ValueError, match="bogus"):
        GPTConfig.from_dict({"bogus": 1})
