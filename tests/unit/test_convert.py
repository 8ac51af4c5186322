"""HF <-> Megatron conversion: bit-exact round trips, layout consistency across TP sizes, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_prune.__main__ import main
from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.convert import merge_tensor
from megatron_prune.checkpoint.convert_files import hf_to_megatron, megatron_to_hf
from megatron_prune.checkpoint.keys import stage_tensor_maps
from megatron_prune.config.shape import LlamaShape
from tests.helpers import VARIANTS, make_hf_model


def hf_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def merged_megatron(root):
    """Full tensors of a Megatron checkpoint keyed by megatron name (stage-local keys made global)."""
    meta = mio.read_meta(root)
    out = {}
    for pp_rank in range(meta.pp):
        sds = [mio.load_rank(root, t, pp_rank, meta)["model"] for t in range(meta.tp)]
        per = meta.shape.num_layers // meta.pp
        for mkey, _, kind in stage_tensor_maps(meta.shape.num_layers, meta.pp, pp_rank,
                                               meta.shape.tie_word_embeddings):
            gkey = mkey
            if mkey.startswith("decoder.layers."):
                i = int(mkey.split(".")[2])
                gkey = mkey.replace(f"layers.{i}.", f"layers.{i + pp_rank * per}.", 1)
            out[gkey] = merge_tensor(kind, [sd[mkey] for sd in sds], meta.shape)
    return out


@pytest.mark.parametrize("variant", ["gqa", "tied", "vocab1000", "llama3rope"])
def test_round_trip_tp2_pp2_is_bit_exact(tmp_path, variant):
    make_hf_model(tmp_path / "hf", **VARIANTS[variant])
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=2, pp=2, progress=False)
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", progress=False)
    a, b = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    cfg_a = json.loads((tmp_path / "hf/config.json").read_text())
    cfg_b = json.loads((tmp_path / "back/config.json").read_text())
    assert LlamaShape.from_hf_config(cfg_a) == LlamaShape.from_hf_config(cfg_b)
    from transformers import LlamaConfig

    ca, cb = LlamaConfig.from_pretrained(tmp_path / "hf"), LlamaConfig.from_pretrained(tmp_path / "back")
    skip = {"transformers_version", "_name_or_path"}
    assert {k: v for k, v in ca.to_dict().items() if k not in skip} == \
           {k: v for k, v in cb.to_dict().items() if k not in skip}


def test_tp1_and_tp2_merge_to_identical_tensors(tmp_path):
    make_hf_model(tmp_path / "hf", **VARIANTS["vocab1000"])
    hf_to_megatron(tmp_path / "hf", tmp_path / "tp1", tp=1, progress=False)
    hf_to_megatron(tmp_path / "hf", tmp_path / "tp2", tp=2, progress=False)
    a, b = merged_megatron(tmp_path / "tp1"), merged_megatron(tmp_path / "tp2")
    assert sorted(a) == sorted(b)
    for k in a:
        assert all(torch.equal(x, y) for x, y in zip(a[k], b[k])), k


def test_checkpoint_layout_and_args(tmp_path):
    make_hf_model(tmp_path / "hf", **VARIANTS["tied"])
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=2, pp=2, dtype="bf16", progress=False)
    root = tmp_path / "mg"
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "release"
    state = torch.load(root / "release/mp_rank_01_001/model_optim_rng.pt", weights_only=False)
    args = state["args"]
    assert state["checkpoint_version"] == 3.0 and state["iteration"] == 0
    assert (args.num_layers, args.num_query_groups, args.group_query_attention) == (4, 2, True)
    assert args.padded_vocab_size == 512 and args.untie_embeddings_and_output_weights is False
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    sd = state["model"]
    # tied + PP>1: the last stage holds the output weight (a copy of its embedding shard)
    emb0 = torch.load(root / "release/mp_rank_01_000/model_optim_rng.pt", weights_only=False)["model"]
    assert torch.equal(sd["output_layer.weight"], emb0["embedding.word_embeddings.weight"])
    assert sd["output_layer.weight"].dtype == torch.bfloat16
    assert "decoder.layers.1.self_attention.linear_qkv._extra_state" in sd
    meta = json.loads((root / "megatron_prune.json").read_text())
    assert meta["shape"]["vocab_size"] == 512 and meta["history"][0]["op"] == "convert"


def test_te_names_round_trip(tmp_path):
    make_hf_model(tmp_path / "hf", **VARIANTS["gqa"])
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=2, te_names=True, progress=False)
    sd = mio.load_rank(tmp_path / "mg", 0, 0)["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in sd
    assert "decoder.layers.0.input_layernorm.weight" not in sd
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", progress=False)
    a, b = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_safetensors_and_bin_inputs(tmp_path):
    model = make_hf_model(tmp_path / "hf", **VARIANTS["gqa"])
    ref = hf_tensors(tmp_path / "hf")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((tmp_path / "hf/config.json").read_text())
    torch.save(ref, binary / "pytorch_model.bin")
    for src in (sharded, binary):
        hf_to_megatron(src, tmp_path / f"mg-{src.name}", tp=2, progress=False)
        megatron_to_hf(tmp_path / f"mg-{src.name}", tmp_path / f"back-{src.name}", progress=False,
                       max_shard_bytes=50_000)
        back = hf_tensors(tmp_path / f"back-{src.name}")
        assert (tmp_path / f"back-{src.name}/model.safetensors.index.json").exists()
        assert sorted(back) == sorted(ref) and all(torch.equal(back[k], ref[k]) for k in ref)


def test_tokenizer_files_travel(tmp_path):
    from tests.helpers import save_tiny_tokenizer

    save_tiny_tokenizer(tmp_path / "hf")
    make_hf_model(tmp_path / "hf", vocab_size=300)
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=2, progress=False)
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", progress=False)
    for d in ("mg", "back"):
        assert (tmp_path / d / "tokenizer.json").read_bytes() == (tmp_path / "hf/tokenizer.json").read_bytes()


# ----------------------------------------------------------------------------- bad input
def run_cli(capsys, *argv):
    capsys.readouterr()  # drop output of the set-up (transformers' progress bars)
    rc = main(["convert", "hf-to-megatron", "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_missing_config_json(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    rc, err = run_cli(capsys, "--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "out"), "--tp", "2")
    assert rc == 2 and err.startswith("error:") and "missing config.json" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tp,msg", [(3, "TP 3 does not divide 8 heads / 2 query groups: use TP 1 or 2"),
                                    (4, "TP 4 does not divide 8 heads / 2 query groups: use TP 1 or 2")])
def test_heads_or_groups_not_divisible(tmp_path, capsys, tp, msg):
    make_hf_model(tmp_path / "hf", **VARIANTS["gqa"])
    rc, err = run_cli(capsys, "--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "out"), "--tp", str(tp))
    assert rc == 2 and msg in err and "\n" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_truncated_safetensors(tmp_path, capsys):
    make_hf_model(tmp_path / "hf", **VARIANTS["gqa"])
    f = tmp_path / "hf/model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    rc, err = run_cli(capsys, "--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "out"))
    assert rc == 2 and "model.safetensors: truncated safetensors file" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_missing_tensor(tmp_path, capsys):
    make_hf_model(tmp_path / "hf", **VARIANTS["gqa"])
    f = tmp_path / "hf/model.safetensors"
    sd = load_file(f)
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, f)
    rc, err = run_cli(capsys, "--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "out"))
    assert rc == 2 and "model.layers.2.mlp.up_proj.weight" in err and not (tmp_path / "out").exists()


def test_existing_save_refused_then_overwritten(tmp_path, capsys):
    make_hf_model(tmp_path / "hf", **VARIANTS["gqa"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, err = run_cli(capsys, "--hf-dir", str(tmp_path / "hf"), "--save", str(out))
    assert rc == 2 and "exists and is not empty" in err and (out / "keep.txt").read_text() == "precious"
    rc, _ = run_cli(capsys, "--hf-dir", str(tmp_path / "hf"), "--save", str(out), "--overwrite")
    assert rc == 0 and not (out / "keep.txt").exists() and (out / "latest_checkpointed_iteration.txt").exists()


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    import megatron_prune.checkpoint.convert_files as cf

    make_hf_model(tmp_path / "hf", **VARIANTS["gqa"])
    calls = {"n": 0}
    real = cf.mio.save_rank

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(cf.mio, "save_rank", flaky)
    with pytest.raises(OSError, match="disk full"):
        hf_to_megatron(tmp_path / "hf", tmp_path / "out", tp=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_export_missing_rank_file(tmp_path, capsys):
    make_hf_model(tmp_path / "hf", **VARIANTS["gqa"])
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=2, progress=False)
    (tmp_path / "mg/release/mp_rank_01/model_optim_rng.pt").unlink()
    capsys.readouterr()
    rc = main(["convert", "megatron-to-hf", "--no-progress", "--load", str(tmp_path / "mg"),
               "--save", str(tmp_path / "back")])
    err = capsys.readouterr().err
    assert rc == 2 and "mp_rank_01/model_optim_rng.pt: missing rank file" in err
    assert not (tmp_path / "back").exists()


# ---------------------------------------------------------------- features we do not model are refused (issue 26)
def make_mistral(path, seed: int = 0, **overrides):
    """A tiny MistralForCausalLM written by transformers itself (fp32 safetensors)."""
    from transformers import MistralConfig, MistralForCausalLM

    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
              initializer_range=0.1, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**kw)).eval()
    model.save_pretrained(path)
    return model


def edit_config(path, **fields):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("model,edit,named", [
    ("mistral16", {}, "sliding_window 16"),
    ("mistral", {"sliding_window": 100}, "sliding_window 100"),
    ("mistral", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling: rope scaling type 'yarn'"),
    ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ("llama", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ("llama", {"head_dim": None, "hidden_size": 60}, "head_dim"),
])
def test_unsupported_model_features_are_refused(tmp_path, capsys, model, edit, named):
    """A config field that changes what the model computes is refused in one line naming it and the file, never
    dropped. Before: a Mistral with sliding_window 16 converted with exit 0, and its export differed by up to
    0.575 in the logits from position 16 on."""
    hf = tmp_path / "hf"
    if model.startswith("mistral"):
        make_mistral(hf, sliding_window=16 if model == "mistral16" else None)
    else:
        make_hf_model(hf, **VARIANTS["gqa"])
    if edit:
        edit_config(hf, **edit)
    rc, err = run_cli(capsys, "--hf-dir", str(hf), "--save", str(tmp_path / "out"))
    assert rc == 2 and err.startswith(f"error: {hf / 'config.json'}: {named}") and "\n" not in err, err
    assert "not supported" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("window", [None, 256])
def test_mistral_with_full_attention_converts_exactly(tmp_path, window):
    """Mistral without a window (v0.2 and later), or with one no shorter than its context: the same function as
    LLaMA. The export, run as LlamaForCausalLM, matches transformers' own MistralForCausalLM."""
    from transformers import LlamaForCausalLM

    from tests.helpers import random_tokens

    ref = make_mistral(tmp_path / "hf", sliding_window=window)
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=2, progress=False)
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", progress=False)
    back = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = random_tokens(512, seq=64)
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, ref(tokens).logits, rtol=1e-5, atol=1e-5)
