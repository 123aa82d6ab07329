import math

import pytest
import torch

from llama_trt.config import LlamaConfig, Precision, RopeScaling
from llama_trt.errors import ConfigError


def base(**kw):
    d = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2)
    d.update(kw)
    return d


def test_derived_fields():
    c = LlamaConfig(**base())
    assert c.head_dim == 8 and c.rotary_dim == 8 and c.num_groups == 4
    assert c.eos_token_id == (2,)


def test_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        LlamaConfig(**base(num_kv_heads=3, vocab_size=0, rms_norm_eps=-1.0, rope_theta=0.5))
    msg = str(e.value)
    for needle in ("num_kv_heads (3) must divide num_heads (8)", "vocab_size must be a positive",
                   "rms_norm_eps must be > 0", "rope_theta must be > 1"):
        assert needle in msg, msg


def test_special_ids_must_be_in_vocab():
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        LlamaConfig(**base(eos_token_id=500))


def test_rope_scaling_validated():
    with pytest.raises(ConfigError, match="not supported"):
        LlamaConfig(**base(rope_scaling=RopeScaling("yarn", factor=2.0)))
    with pytest.raises(ConfigError, match="high_freq_factor > low_freq_factor"):
        LlamaConfig(**base(rope_scaling=RopeScaling("llama3", 8.0, low_freq_factor=4.0, high_freq_factor=1.0)))


def test_dict_round_trip():
    c = LlamaConfig(**base(rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64), eos_token_id=(2, 3)))
    assert LlamaConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown LlamaConfig fields: bogus"):
        LlamaConfig.from_dict({**c.to_dict(), "bogus": 1})


def test_precision_parse():
    assert Precision.parse("FP16") is Precision.FP16
    with pytest.raises(ConfigError, match="fp32, fp16, int8"):
        Precision.parse("fp8")


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_inv_freq_matches_transformers(scaling):
    """Independent reference: transformers' own RoPE initialisation functions."""
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    if scaling:
        rope_parameters = {**scaling, "rope_theta": 500000.0}
    hf = HFConfig(hidden_size=256, num_attention_heads=4, rope_parameters=rope_parameters)
    fn = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]] if scaling else None
    if fn is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        ref, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        ref, _ = fn(hf, "cpu")
    ours = LlamaConfig(**base(hidden_size=256, num_heads=4, num_kv_heads=4, rope_theta=500000.0,
                              rope_scaling=RopeScaling(**{("rope_type" if k == "rope_type" else k): v
                                                          for k, v in scaling.items()}) if scaling else None))
    got = torch.tensor(ours.inv_freq(), dtype=torch.float32)
    torch.testing.assert_close(got, ref.float(), rtol=1e-6, atol=0)


def test_parameter_count_tied_and_untied():
    c = LlamaConfig(**base())
    per_layer = 64 * 64 * 2 + 64 * 16 * 2 + 3 * 64 * 128 + 2 * 64
    assert c.num_parameters() == 100 * 64 * 2 + 2 * per_layer + 64
    t = LlamaConfig(**base(tie_word_embeddings=True))
    assert c.num_parameters() - t.num_parameters() == 100 * 64
    assert math.isclose(t.num_parameters(), 100 * 64 + 2 * per_layer + 64)
