import json

import pytest

from megatron_prune.config.shape import LlamaShape, RopeScaling, ShapeError, read_hf_config

BASE = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=96, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256, rms_norm_eps=1e-5)


def test_reads_transformers4_and_5_rope_spellings():
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    v4 = LlamaShape.from_hf_config({**BASE, "rope_theta": 500000.0, "rope_scaling": scaling})
    v5 = LlamaShape.from_hf_config({**BASE, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
    assert v4 == v5
    assert v4.rope_theta == 500000.0 and v4.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert v4.kv_channels == 8 and v4.num_query_groups == 2 and v4.heads_per_group == 4


def test_hf_config_round_trip_keeps_unmodelled_fields():
    cfg = {**BASE, "rope_theta": 10000.0, "bos_token_id": 7, "eos_token_id": 9, "tie_word_embeddings": True}
    shape = LlamaShape.from_hf_config(cfg)
    out = shape.to_hf_config(cfg)
    assert out["bos_token_id"] == 7 and out["eos_token_id"] == 9
    assert LlamaShape.from_hf_config(out) == shape
    assert LlamaShape.from_dict(json.loads(json.dumps(shape.to_dict()))) == shape


def test_mha_default_groups_and_head_dim():
    cfg = {k: v for k, v in BASE.items() if k != "num_key_value_heads"}
    shape = LlamaShape.from_hf_config(cfg)
    assert shape.num_query_groups == 8 and shape.kv_channels == 8


@pytest.mark.parametrize("tp,pp,msg", [
    (3, 1, "TP 3 does not divide 8 heads / 2 query groups: use TP 1 or 2"),
    (4, 1, "TP 4 does not divide 8 heads / 2 query groups: use TP 1 or 2"),
    (1, 3, "PP 3 does not divide 4 layers: use PP 1, 2 or 4"),
])
def test_parallel_errors_name_every_factor(tp, pp, msg):
    shape = LlamaShape.from_hf_config(BASE)
    with pytest.raises(ShapeError) as e:
        shape.check_parallel(tp, pp)
    assert str(e.value) == msg


def test_padded_vocab_follows_megatron_rule():
    shape = LlamaShape.from_hf_config(BASE)
    assert shape.padded_vocab(128, 1) == 1024
    assert shape.padded_vocab(128, 2) == 1024
    assert shape.padded_vocab(128, 8) == 1024
    assert shape.padded_vocab(128, 16) == 2048
    assert shape.replace(vocab_size=32000).padded_vocab(128, 8) == 32768


def test_invalid_shapes_rejected():
    with pytest.raises(ShapeError, match=r"heads 8 not divisible by query groups 3 \(heads=8, groups=3\)"):
        LlamaShape.from_hf_config({**BASE, "num_key_value_heads": 3})
    with pytest.raises(ShapeError, match="lacks required field 'vocab_size'"):
        LlamaShape.from_hf_config({k: v for k, v in BASE.items() if k != "vocab_size"})
    with pytest.raises(ShapeError, match="rope scaling type 'yarn' is not supported"):
        LlamaShape.from_hf_config({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ShapeError, match="attention_bias"):
        LlamaShape.from_hf_config({**BASE, "attention_bias": True})


def test_missing_config_json(tmp_path):
    with pytest.raises(ShapeError, match="missing config.json"):
        read_hf_config(tmp_path)


def test_param_count_matches_transformers():
    import torch  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM

    for tied in (False, True):
        cfg = LlamaConfig(**BASE, tie_word_embeddings=tied)
        n_ref = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
        assert LlamaShape.from_hf_config(cfg.to_dict()).num_params() == n_ref
