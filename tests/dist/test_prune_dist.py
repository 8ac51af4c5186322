"""The distributed pruner at TP=2 against HF transformers on weights sliced by the test's own code
(tests.unit.test_prune_apply.reference_slice), in one torchrun launch for all cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.convert_files import hf_to_megatron, megatron_to_hf
from megatron_prune.config.shape import LlamaShape
from megatron_prune.prune.random_plan import random_plan
from megatron_prune.prune.select import PruneTarget
from megatron_prune.testing import run_distributed
from tests.helpers import llama_config, make_hf_model, random_tokens, save_tiny_tokenizer
from tests.unit.test_prune_apply import merged_to_hf, reference_slice

pytestmark = pytest.mark.dist
MHA, GQA = dict(num_attention_heads=4, num_key_value_heads=4), dict(num_attention_heads=8, num_key_value_heads=4)
ZERO_HIDDEN = [3, 10, 17, 30, 41, 50, 55, 63]
SEQ, SAMPLES = 16, 8


def zeroed_groups(layer: int) -> list[int]:
    return [layer % 2, 2 + (layer + 1) % 2]  # one group (MHA: one head) per TP rank


def zeroed_ffn(layer: int) -> list[int]:
    g = torch.Generator().manual_seed(100 + layer)
    return sorted(torch.randperm(48, generator=g)[:8].tolist() + (48 + torch.randperm(48, generator=g)[:8]).tolist())


@torch.no_grad()
def zero_units(model, hidden=(), groups=True, identity_layer=None):
    """Make units contribute exactly nothing: hidden channels (residual stream stays 0), query groups (v = 0,
    so their heads' context is 0), FFN channels (up = 0), and optionally a whole layer (output = input)."""
    cfg = model.config
    d, g = cfg.head_dim, cfg.num_key_value_heads
    m = model.model
    for c in hidden:
        m.embed_tokens.weight[:, c] = 0
        m.norm.weight[c] = 0
        model.lm_head.weight[:, c] = 0
    for i, layer in enumerate(m.layers):
        for c in hidden:
            layer.self_attn.o_proj.weight[c] = 0
            layer.mlp.down_proj.weight[c] = 0
            layer.input_layernorm.weight[c] = 0
            layer.post_attention_layernorm.weight[c] = 0
        if groups:
            for gi in zeroed_groups(i):
                layer.self_attn.v_proj.weight.view(g, d, -1)[gi] = 0
        layer.mlp.up_proj.weight[zeroed_ffn(i)] = 0
        if i == identity_layer:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


@torch.no_grad()
def skew_units(model):
    """Rank 1's groups and FFN channels get 10x weight norms: a global magnitude plan prefers them."""
    cfg = model.config
    half_q = cfg.num_attention_heads * cfg.head_dim // 2
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[:, half_q:] *= 10
        layer.mlp.down_proj.weight[:, cfg.intermediate_size // 2:] *= 10


def write_indexed(prefix, vocab: int) -> list[int]:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    ids = torch.randint(0, vocab, (SAMPLES * SEQ + 40,), generator=torch.Generator().manual_seed(5))
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    builder.add_document(ids, [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return ids.tolist()


def hf_logits(state: dict, shape: LlamaShape, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a fresh LlamaForCausalLM with `shape` and exactly `state` loaded (strict)."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(hidden_size=shape.hidden_size, intermediate_size=shape.ffn_hidden_size,
                       num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
                       num_key_value_heads=shape.num_query_groups, head_dim=shape.kv_channels,
                       tie_word_embeddings=shape.tie_word_embeddings)
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(tokens[:, :-1]).logits


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    models = {"mha": make_hf_model(root / "mha", seed=1, **MHA), "gqa": make_hf_model(root / "gqa", seed=2, **GQA),
              "zero_gqa": make_hf_model(root / "zero_gqa", seed=3, **GQA),
              "zero_mha": make_hf_model(root / "zero_mha", seed=4, **MHA),
              "skew": make_hf_model(root / "skew", seed=5, **GQA)}
    zero_units(models["zero_gqa"], hidden=ZERO_HIDDEN)
    zero_units(models["zero_mha"], identity_layer=1)
    skew_units(models["skew"])
    for name, model in models.items():
        model.save_pretrained(root / name)
        hf_to_megatron(root / name, root / f"{name}-tp2", tp=2, progress=False)
    ids = write_indexed(root / "calib", 512)
    tok = save_tiny_tokenizer(root / "tok")
    (root / "text.txt").write_text("It was the best of times, it was the worst of times. " * 60)
    ind = {"data": str(root / "calib"), "samples": SAMPLES, "seq_length": SEQ, "micro_batch_size": 4}
    cases = [
        dict(name="mha-random", load="mha-tp2", target=dict(hidden_size=48, num_attention_heads=2,
                                                            ffn_hidden_size=64, drop_layers=[2])),
        dict(name="gqa-random", load="gqa-tp2", target=dict(hidden_size=40, num_attention_heads=2,
                                                            num_query_groups=2, ffn_hidden_size=48,
                                                            drop_layers=[0, 3])),
        dict(name="gqa-activation", load="gqa-tp2", importance="activation",
             target=dict(hidden_size=48, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                         num_layers=3),
             calib=dict(data=str(root / "text.txt"), tokenizer=str(tok), samples=4, seq_length=16)),
        dict(name="gqa-replan", load="gqa-tp2", plan=str(root / "gqa-random/prune_plan.json")),
        dict(name="skew-global", load="skew-tp2", importance="magnitude",
             target=dict(hidden_size=48, num_attention_heads=6, num_query_groups=3, ffn_hidden_size=64,
                         drop_layers=[1], mode="global")),
        dict(name="zero-gqa", load="zero_gqa-tp2", importance="activation", calib=ind,
             target=dict(hidden_size=56, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=80)),
        dict(name="zero-mha", load="zero_mha-tp2", importance="activation", calib=ind,
             target=dict(num_attention_heads=2, ffn_hidden_size=80, num_layers=3)),
    ]
    for c in cases:
        c.update(load=str(root / c["load"]), save=str(root / c["name"]))
    tokens = random_tokens(512)
    logit_cases = [{"name": n, "ckpt": str(root / n), "tp": 2, "pp": 1, "tokens": tokens.tolist()}
                   for n in ("mha-random", "gqa-random", "gqa-activation", "zero-mha")]
    per_rank = run_distributed(2, "tests.dist.prune_cases:prune_then_logits",
                               {"prune": cases, "logits": logit_cases})
    logits = {n: r["logits"] for res in per_rank for n, r in res["logits"].items() if r["logits"] is not None}
    return {"root": root, "models": models, "per_rank": per_rank, "logits": logits, "tokens": tokens, "ids": ids}


def run_of(world, name, rank=0):
    return world["per_rank"][rank]["runs"][name]


def sliced_logits(world, model_name, plan_json):
    sd = {k: v.clone() for k, v in world["models"][model_name].state_dict().items()}
    plan_shape = LlamaShape.from_dict(plan_json["target_shape"])
    return hf_logits(reference_slice(sd, plan_json), plan_shape, world["tokens"])


@pytest.mark.parametrize("case, model", [("mha-random", "mha"), ("gqa-random", "gqa"), ("gqa-activation", "gqa")])
def test_pruned_megatron_logits_match_hf_on_independently_sliced_weights(world, case, model):
    plan = run_of(world, case)["plan"]
    ref = sliced_logits(world, model, plan)
    got = world["logits"][case]
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    t = plan["target_shape"]
    assert t["num_layers"] < plan["source_shape"]["num_layers"] and t["hidden_size"] < 64
    assert t["ffn_hidden_size"] < 96 and t["num_attention_heads"] < plan["source_shape"]["num_attention_heads"]


def test_random_plan_is_identical_on_every_rank_and_tp_size(world):
    a, b = run_of(world, "mha-random", 0), run_of(world, "mha-random", 1)
    assert a["fingerprint"] == b["fingerprint"]
    shape = mio.read_meta(world["root"] / "mha-tp2").shape
    spec = PruneTarget(hidden_size=48, num_attention_heads=2, ffn_hidden_size=64, drop_layers=(2,))
    assert random_plan(shape, spec, seed=1234, tp=1).fingerprint() == a["fingerprint"]


def test_balance_shards_are_equal_on_every_rank(world):
    for case in ("mha-random", "gqa-random", "gqa-activation"):
        assert run_of(world, case, 0)["shapes"] == run_of(world, case, 1)["shapes"]
        assert run_of(world, case)["rank_sizes"] is None


def test_reapplied_plan_gives_the_same_checkpoint(world):
    assert run_of(world, "gqa-replan")["fingerprint"] == run_of(world, "gqa-random")["fingerprint"]
    root = world["root"]
    for r in range(2):
        a = mio.load_rank(root / "gqa-random", r, 0)["model"]
        b = mio.load_rank(root / "gqa-replan", r, 0)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a if a[k] is not None)


def test_same_plan_at_tp1_via_cli_merges_to_identical_tensors(world):
    root = world["root"]
    hf_to_megatron(root / "gqa", root / "gqa-tp1", tp=1, progress=False)
    out = subprocess.run([sys.executable, "-m", "megatron_prune", "prune", "--load", str(root / "gqa-tp1"),
                          "--plan", str(root / "gqa-random/prune_plan.json"), "--save", str(root / "gqa-tp1-p"),
                          "--no-progress"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    meta1, meta2 = mio.read_meta(root / "gqa-tp1-p"), mio.read_meta(root / "gqa-random")
    assert meta1.shape == meta2.shape and meta1.history[-1]["op"] == "prune"
    one = merged_to_hf([mio.load_rank(root / "gqa-tp1-p", 0, 0)["model"]], meta1.shape)
    two = merged_to_hf([mio.load_rank(root / "gqa-random", r, 0)["model"] for r in range(2)], meta2.shape)
    assert sorted(one) == sorted(two) and all(torch.equal(one[k], two[k]) for k in one)


def test_global_shards_are_uneven_and_export_to_hf_correctly(world, tmp_path):
    from safetensors.torch import load_file

    run = run_of(world, "skew-global")
    assert run["rank_sizes"]["groups"] == [[1, 2]] * 3 and run["rank_sizes"]["ffn"] == [[16, 48]] * 3
    assert run_of(world, "skew-global", 0)["shapes"] != run_of(world, "skew-global", 1)["shapes"]
    megatron_to_hf(world["root"] / "skew-global", tmp_path / "hf", progress=False)
    got = {}
    for f in sorted((tmp_path / "hf").glob("*.safetensors")):
        got.update(load_file(f))
    sd = {k: v.clone() for k, v in world["models"]["skew"].state_dict().items()}
    ref = reference_slice(sd, run["plan"])
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        exported = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()(world["tokens"][:, :-1]).logits
    ref_logits = sliced_logits(world, "skew", run["plan"])
    assert (exported - ref_logits).abs().max().item() <= 1e-4


def test_activation_importance_removes_exactly_the_zeroed_units(world):
    plan = run_of(world, "zero-gqa")["plan"]
    assert plan["hidden"] == [c for c in range(64) if c not in ZERO_HIDDEN]
    for layer in plan["layers"]:
        i = layer["source"]
        assert layer["groups"] == [g for g in range(4) if g not in zeroed_groups(i)]
        assert layer["ffn"] == [c for c in range(96) if c not in zeroed_ffn(i)]
    assert plan["calibration"]["samples"] == SAMPLES and plan["method"] == "activation"


def test_pruning_zeroed_heads_ffn_and_identity_layer_keeps_the_logits(world):
    plan = run_of(world, "zero-mha")["plan"]
    assert plan["dropped_layers"] == [1]
    for layer in plan["layers"]:
        assert layer["groups"] == [g for g in range(4) if g not in zeroed_groups(layer["source"])]
    with torch.no_grad():
        ref = world["models"]["zero_mha"](world["tokens"][:, :-1]).logits
    assert (world["logits"]["zero-mha"] - ref).abs().max().item() <= 1e-4


def test_block_influence_matches_hf_hidden_states(world):
    plan = run_of(world, "zero-mha")["plan"]
    ids = torch.tensor(world["ids"][: SAMPLES * SEQ + 1])
    windows = torch.stack([ids[i * SEQ:(i + 1) * SEQ + 1] for i in range(SAMPLES)])
    import hashlib

    assert hashlib.sha256(windows.numpy().astype("int64").tobytes()).hexdigest() == plan["calibration"]["sha256"]
    with torch.no_grad():
        hs = world["models"]["zero_mha"](windows[:, :-1], output_hidden_states=True).hidden_states
    n = len(plan["layer_scores"])
    for i in range(n - 1):  # HF's last hidden state is after the final norm
        bi = (1 - torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)).mean().item()
        assert abs(bi - plan["layer_scores"][i]) <= 1e-4, (i, bi, plan["layer_scores"][i])
    assert plan["layer_scores"][1] < 1e-5 < min(s for i, s in enumerate(plan["layer_scores"]) if i != 1)


def test_plan_and_history_are_written(world):
    root = world["root"]
    saved = json.loads((root / "gqa-random/prune_plan.json").read_text())
    assert saved == run_of(world, "gqa-random")["plan"]
    meta = mio.read_meta(root / "gqa-random")
    assert meta.history[-1]["op"] == "prune" and meta.history[-1]["plan"] == saved
    assert (root / "gqa-random/latest_checkpointed_iteration.txt").read_text() == "release"


def test_megatron_lm_args_of_a_pruned_checkpoint(world, capsys):
    from tests.unit.test_megatron_lm_args import check_against_checkpoint, parse_flags, run_cli

    root = world["root"]
    rc, out, _ = run_cli(capsys, "--load", str(root / "gqa-random"), "--tokenizer", str(root / "tok"))
    assert rc == 0
    check_against_checkpoint(root / "gqa-random", parse_flags(out), tokenizer=root / "tok")
