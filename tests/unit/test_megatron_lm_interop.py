"""Megatron-LM interoperability of the stored args: the field names its code reads, what its own rank files hold
(megatron-core enums, iteration-0 saves), read back by our loader. References: HF config values, and the field
lists of Megatron-LM's load_args_from_checkpoint / tools/checkpoint loaders and saver, written out here."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.convert_files import hf_to_megatron, megatron_to_hf
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.checkpoint.safe_pickle import Opaque
from tests.helpers import VARIANTS, make_hf_model

# megatron/training/checkpointing.py load_args_from_checkpoint: `_set_arg` fields of a dense GPT model.
LOAD_ARGS_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads",
                    "num_query_groups", "group_query_attention", "kv_channels", "max_position_embeddings",
                    "position_embedding_type", "add_position_embedding", "use_rotary_position_embeddings",
                    "rotary_base", "rotary_percent", "rotary_interleaved", "add_bias_linear", "add_qkv_bias",
                    "squared_relu", "swiglu", "untie_embeddings_and_output_weights", "apply_layernorm_1p",
                    "normalization", "apply_query_key_layer_scaling", "attention_dropout", "hidden_dropout",
                    "tokenizer_type", "padded_vocab_size", "ckpt_format", "tensor_model_parallel_size",
                    "pipeline_model_parallel_size", "expert_model_parallel_size")
# tools/checkpoint loader_base / loader_legacy check_for_arg (non-None), plus what they read from checkpoint_args.
LOADER_REQUIRED = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers", "hidden_size",
                   "seq_length", "num_attention_heads", "max_position_embeddings", "position_embedding_type",
                   "tokenizer_type", "disable_bias_linear", "params_dtype", "swiglu", "fp16", "bf16",
                   "normalization")
# tools/checkpoint saver_base.parse_megatron_args: read unconditionally (AttributeError without them).
SAVER_REQUIRED = ("sequence_parallel", "apply_query_key_layer_scaling")


def _args_of_every_rank(root):
    """Each rank file's args, read with plain torch (not our loader)."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    return [torch.load(p, weights_only=True)["args"] for p in sorted(root.glob("release/mp_rank_*/*.pt"))]


def test_rank_files_carry_megatron_lm_field_names(tmp_path):
    make_hf_model(tmp_path / "hf", **VARIANTS["llama3rope"], rms_norm_eps=1e-6)
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=2, pp=2, progress=False)
    all_args = _args_of_every_rank(tmp_path / "mg")
    assert len(all_args) == 4
    for a in all_args:
        missing = [f for f in LOAD_ARGS_FIELDS + LOADER_REQUIRED + SAVER_REQUIRED if not hasattr(a, f)]
        assert not missing, missing
        assert all(getattr(a, f) is not None for f in LOADER_REQUIRED)
        # both spellings of the epsilon (Megatron-LM renamed norm_epsilon to layernorm_epsilon)
        assert a.layernorm_epsilon == 1e-6 and a.norm_epsilon == 1e-6
        assert a.sequence_parallel is False and a.apply_query_key_layer_scaling is False
        assert a.use_rope_scaling is True and a.rope_scaling_factor == 8.0 and a.rotary_base == 500000
        assert (a.num_layers, a.hidden_size, a.ffn_hidden_size, a.num_attention_heads) == (4, 64, 96, 4)
        assert (a.group_query_attention, a.num_query_groups, a.kv_channels) == (True, 2, 16)
        assert (a.normalization, a.swiglu, a.add_bias_linear, a.disable_bias_linear) == ("RMSNorm", True, False, True)
        assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size) == (2, 2)
        assert a.position_embedding_type == "rope" and a.add_position_embedding is True
        assert a.ckpt_format == "torch" and a.params_dtype == torch.float32


def _saver_copy(checkpoint_args, margs):
    """tools/checkpoint saver_base._load_checkpoint_args: copy each checkpoint field its own parser has."""
    for name, value in vars(checkpoint_args).items():
        if hasattr(margs, name):
            setattr(margs, name, value)
    return margs


def test_megatron_lm_converter_keeps_our_epsilon(tmp_path):
    make_hf_model(tmp_path / "hf", **VARIANTS["gqa"], rms_norm_eps=1e-6)
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=2, progress=False)
    ckpt_args = _args_of_every_rank(tmp_path / "mg")[0]
    new_parser = argparse.Namespace(layernorm_epsilon=1e-5, sequence_parallel=None)  # current Megatron-LM names
    old_parser = argparse.Namespace(norm_epsilon=1e-5)                               # before the rename
    assert _saver_copy(ckpt_args, new_parser).layernorm_epsilon == 1e-6
    assert _saver_copy(ckpt_args, old_parser).norm_epsilon == 1e-6


def _megatron_lm_args(**kw):
    """args as current Megatron-LM saves them for a small LLaMA: new field names only."""
    a = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, group_query_attention=True,
             num_query_groups=2, kv_channels=16, max_position_embeddings=256, padded_vocab_size=512, vocab_size=None,
             tensor_model_parallel_size=1, pipeline_model_parallel_size=1, normalization="RMSNorm", swiglu=True,
             add_bias_linear=False, position_embedding_type="rope", rotary_base=10000, bf16=False, fp16=False,
             untie_embeddings_and_output_weights=True, transformer_impl="local")
    a.update(kw)
    return argparse.Namespace(**a)


@pytest.mark.parametrize("name", ["layernorm_epsilon", "norm_epsilon"])
def test_meta_reads_either_epsilon_name(name):
    meta = mio.meta_from_args(_megatron_lm_args(**{name: 1e-6}))
    assert meta.shape.norm_eps == 1e-6


def test_meta_reads_llama3_rope_scaling():
    meta = mio.meta_from_args(_megatron_lm_args(use_rope_scaling=True, rope_scaling_factor=32.0))
    rs = meta.shape.rope_scaling
    assert rs is not None and rs.factor == 32.0
    # megatron-core's fixed llama3 parameters (rotary_pos_embedding._apply_scaling defaults)
    assert (rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings) == (1.0, 4.0, 8192)
    assert mio.meta_from_args(_megatron_lm_args(use_rope_scaling=False)).shape.rope_scaling is None


def test_meta_of_a_transformer_engine_checkpoint_uses_te_names():
    assert mio.meta_from_args(_megatron_lm_args(transformer_impl="transformer_engine")).te_names is True
    assert mio.meta_from_args(_megatron_lm_args()).te_names is False


def _as_megatron_lm_iteration_zero(root):
    """Megatron-LM's layout of an iteration-0 save: iter_0000000/ and tracker "0", no megatron_prune.json."""
    (root / "release").rename(root / "iter_0000000")
    (root / mio.TRACKER).write_text("0")
    (root / mio.META).unlink()


def test_iteration_zero_save_is_found(tmp_path):
    make_hf_model(tmp_path / "hf", **VARIANTS["gqa"])
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=2, progress=False)
    _as_megatron_lm_iteration_zero(tmp_path / "mg")
    assert mio.read_tracker(tmp_path / "mg") == 0
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", progress=False)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "hf/model.safetensors"), load_file(tmp_path / "back/model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _enum_args(args):
    from megatron.core.enums import Fp8Recipe
    from megatron.core.enums import ModelType as CoreModelType
    from megatron.core.transformer.enums import AttnBackend, AttnMaskType, ModelType
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    args.attention_backend = AttnBackend.auto
    args.model_type = ModelType.encoder_or_decoder
    args.core_model_type = CoreModelType.encoder_or_decoder
    args.fp8_recipe = Fp8Recipe.delayed
    args.attn_mask_type = AttnMaskType.causal
    layout = [["embedding", "decoder"], ["decoder", "loss"]]
    args.pipeline_model_parallel_layout = PipelineParallelLayerLayout(layout, 2)
    return args


def test_rank_file_with_megatron_core_enums_loads(tmp_path):
    """Types we do not import become inert values: the enum's value is kept, no constructor runs."""
    make_hf_model(tmp_path / "hf", **VARIANTS["gqa"])
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=2, progress=False)
    for path in sorted((tmp_path / "mg/release").glob("mp_rank_*/model_optim_rng.pt")):
        state = torch.load(path, weights_only=True)
        state["args"] = _enum_args(state["args"])
        torch.save(state, path)
    state = mio.load_rank(tmp_path / "mg", 1, 0)
    backend = state["args"].attention_backend
    assert isinstance(backend, Opaque) and backend.type_name == "megatron.core.transformer.enums.AttnBackend"
    from megatron.core.transformer.enums import AttnBackend

    assert backend.value == AttnBackend.auto.value
    layout = state["args"].pipeline_model_parallel_layout  # its constructor (which parses file values) never ran
    assert isinstance(layout, Opaque) and layout.type_name.endswith("PipelineParallelLayerLayout")
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", progress=False)  # every rank file, through our loader


def test_unknown_global_is_inert_and_a_payload_is_refused_in_one_line(tmp_path):
    import pathlib

    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": {}, "args": argparse.Namespace(where=pathlib.PurePosixPath("/x"))}, path)
    where = mio.load_rank_file(path)["args"].where
    assert isinstance(where, Opaque) and where.type_name == "pathlib.PurePosixPath"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model": {}, "args": argparse.Namespace(x=Payload())}, path)
    with pytest.raises(CheckpointError) as e:
        mio.load_rank_file(path)
    msg = str(e.value)
    assert "refused" in msg and "posix.system" in msg and "\n" not in msg
    assert not (tmp_path / "pwned").exists()


def test_non_llama_megatron_lm_checkpoint_is_refused(tmp_path):
    make_hf_model(tmp_path / "hf", **VARIANTS["gqa"])
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=1, progress=False)
    _as_megatron_lm_iteration_zero(tmp_path / "mg")
    path = tmp_path / "mg/iter_0000000/mp_rank_00/model_optim_rng.pt"
    state = torch.load(path, weights_only=True)
    state["args"].normalization = "LayerNorm"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="not a LLaMA-architecture checkpoint: normalization='LayerNorm'"):
        mio.read_meta(tmp_path / "mg")


_LOAD_AND_MEASURE = """
import resource, sys
from pathlib import Path
import megatron.core.transformer.pipeline_parallel_layer_layout  # imported before the baseline, for both readers
from megatron_prune.checkpoint import megatron_io as mio
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    mio.load_rank_file(Path(sys.argv[1]))
except Exception as e:
    print(type(e).__name__, str(e)[:200], file=sys.stderr)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_crafted_layout_in_args_allocates_nothing(tmp_path):
    """Issue 26: PipelineParallelLayerLayout's constructor parses the string the file gives it ("t*N": N layers), so
    13 characters made 650 MB. Read in a fresh process, the peak RSS must not grow with N."""
    import subprocess
    import sys

    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    class Crafted:
        def __reduce__(self):
            return (PipelineParallelLayerLayout, ("t*20000000", 1))

    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": {}, "args": argparse.Namespace(pipeline_model_parallel_layout=Crafted())}, path)
    assert path.stat().st_size < 4096
    out = subprocess.run([sys.executable, "-c", _LOAD_AND_MEASURE, str(path)], capture_output=True, text=True,
                         timeout=600)
    grown = int(out.stdout.split()[-1])
    assert grown < 64 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB reading a {path.stat().st_size}-byte file"
