"""Applying a plan to Megatron shards and to HF checkpoints, against slicing code written here, independently:
views of the HF tensors per (group, head) rather than the index lists the pruner builds."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.convert import merge_tensor
from megatron_prune.checkpoint.convert_files import hf_to_megatron
from megatron_prune.checkpoint.keys import stage_tensor_maps
from megatron_prune.config.shape import LlamaShape
from megatron_prune.prune.apply import apply_rank, target_shape
from megatron_prune.prune.apply_hf import prune_hf
from megatron_prune.prune.plan import PlanError
from megatron_prune.prune.random_plan import random_plan
from megatron_prune.prune.select import PruneTarget
from tests.helpers import make_hf_model

MODELS = {  # name: (HF overrides, prune target)
    "mha": (dict(num_attention_heads=4, num_key_value_heads=4),
            PruneTarget(hidden_size=48, num_attention_heads=2, ffn_hidden_size=64, drop_layers=(2,))),
    "gqa": (dict(num_attention_heads=8, num_key_value_heads=4),
            PruneTarget(hidden_size=40, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                        drop_layers=(0, 3))),
    "tied": (dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
             PruneTarget(hidden_size=56, num_attention_heads=2, ffn_hidden_size=80)),
}


def reference_slice(sd: dict, plan: dict) -> dict:
    """The pruned HF state dict, written from the plan's JSON with per-group/per-head views."""
    s = plan["source_shape"]
    h, g, d = s["hidden_size"], s["num_query_groups"], s["kv_channels"]
    hpg = s["num_attention_heads"] // g
    keep_h = torch.tensor(plan["hidden"])
    out = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"][:, keep_h],
           "model.norm.weight": sd["model.norm.weight"][keep_h]}
    if "lm_head.weight" in sd and not s["tie_word_embeddings"]:
        out["lm_head.weight"] = sd["lm_head.weight"][:, keep_h]
    for new, layer in enumerate(plan["layers"]):
        a, b = f"model.layers.{layer['source']}.", f"model.layers.{new}."
        q = sd[a + "self_attn.q_proj.weight"].view(g, hpg, d, h)
        o = sd[a + "self_attn.o_proj.weight"].view(h, g, hpg, d)
        pairs = [(gi, hi) for gi, heads in zip(layer["groups"], layer["heads"]) for hi in heads]
        out[b + "self_attn.q_proj.weight"] = torch.cat([q[gi, hi] for gi, hi in pairs])[:, keep_h]
        out[b + "self_attn.o_proj.weight"] = torch.cat([o[:, gi, hi] for gi, hi in pairs], dim=1)[keep_h]
        for kv in ("k_proj", "v_proj"):
            w = sd[a + f"self_attn.{kv}.weight"].view(g, d, h)
            out[b + f"self_attn.{kv}.weight"] = torch.cat([w[gi] for gi in layer["groups"]])[:, keep_h]
        f = torch.tensor(layer["ffn"])
        out[b + "mlp.gate_proj.weight"] = sd[a + "mlp.gate_proj.weight"][f][:, keep_h]
        out[b + "mlp.up_proj.weight"] = sd[a + "mlp.up_proj.weight"][f][:, keep_h]
        out[b + "mlp.down_proj.weight"] = sd[a + "mlp.down_proj.weight"][keep_h][:, f]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[b + f"{norm}.weight"] = sd[a + f"{norm}.weight"][keep_h]
    return out


def merged_to_hf(sds: list[dict], shape: LlamaShape) -> dict:
    """Merge TP shards (PP=1) with the converter's layout functions into HF-named tensors."""
    out = {}
    for mkey, hf_keys, kind in stage_tensor_maps(shape.num_layers, 1, 0, shape.tie_word_embeddings):
        out.update(zip(hf_keys, merge_tensor(kind, [sd[mkey] for sd in sds], shape)))
    return out


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    overrides, spec = MODELS[request.param]
    hf = make_hf_model(root / "hf", seed=3, **overrides)
    for tp in (1, 2):
        hf_to_megatron(root / "hf", root / f"tp{tp}", tp=tp, progress=False)
    return root, {k: v.clone() for k, v in hf.state_dict().items()}, spec


def pruned_shards(root, tp, plan):
    meta = mio.read_meta(root / f"tp{tp}")
    return [apply_rank(mio.load_rank(root / f"tp{tp}", r, 0, meta)["model"], plan, tp, r) for r in range(tp)]


@pytest.mark.parametrize("mode", ["balance", "global"])
def test_megatron_shards_match_independent_hf_slicing(model, mode):
    root, hf_sd, spec = model
    shape = mio.read_meta(root / "tp2").shape
    plan = random_plan(shape, PruneTarget(**{**spec.__dict__, "mode": mode}), seed=9, tp=2)
    ref = reference_slice(hf_sd, plan.to_json())
    target = target_shape(plan, shape)
    merged = {tp: merged_to_hf(pruned_shards(root, tp, plan), target) for tp in (1, 2)}
    assert sorted(merged[1]) == sorted(merged[2]) == sorted(k for k in ref if k != "lm_head.weight"
                                                            or not shape.tie_word_embeddings)
    for k in merged[1]:
        assert torch.equal(merged[1][k], ref[k]), k
        assert torch.equal(merged[2][k], ref[k]), k


def test_balance_shards_are_equal_and_global_shards_uneven(model):
    root, _, spec = model
    shape = mio.read_meta(root / "tp2").shape
    scores_plan = random_plan(shape, spec, seed=4, tp=2)
    a, b = pruned_shards(root, 2, scores_plan)
    assert {k: tuple(v.shape) for k, v in a.items() if v is not None} == \
           {k: tuple(v.shape) for k, v in b.items() if v is not None}
    # a plan that keeps all FFN channels of rank 0 and few of rank 1 leaves unequal fc1/fc2 shards
    lp = scores_plan.layers[0]
    f = shape.ffn_hidden_size
    uneven = scores_plan.replace(mode="global", layers=(lp.__class__(lp.source, lp.groups, lp.heads,
                                                                     tuple(range(spec.ffn_hidden_size))),
                                                        *scores_plan.layers[1:]))
    a, b = pruned_shards(root, 2, uneven)
    key = "decoder.layers.0.mlp.linear_fc2.weight"
    assert a[key].shape[1] == f // 2 and b[key].shape[1] == spec.ffn_hidden_size - f // 2


def test_shard_of_another_shape_is_rejected(model):
    root, _, spec = model
    shape = mio.read_meta(root / "tp1").shape
    plan = random_plan(shape.replace(num_layers=shape.num_layers + 1), PruneTarget(), seed=1)
    meta = mio.read_meta(root / "tp1")
    with pytest.raises(PlanError, match="shard does not match"):
        apply_rank(mio.load_rank(root / "tp1", 0, 0, meta)["model"], plan, 1, 0)


def test_prune_hf_matches_independent_slicing_and_loads(model, tmp_path):
    from transformers import LlamaForCausalLM

    root, hf_sd, spec = model
    shape = mio.read_meta(root / "tp1").shape
    plan = random_plan(shape, spec, seed=21)
    out = prune_hf(root / "hf", plan, tmp_path / "pruned", progress=False)
    got = load_file(tmp_path / "pruned/model.safetensors")
    ref = reference_slice(hf_sd, plan.to_json())
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "pruned")
    assert loaded.config.head_dim == shape.kv_channels and loaded.config.hidden_size == out.hidden_size
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items() if k in ref)
    assert (tmp_path / "pruned/prune_plan.json").is_file()


def test_prune_hf_rejects_a_plan_for_another_shape(model, tmp_path):
    root, _, _ = model
    shape = mio.read_meta(root / "tp1").shape
    plan = random_plan(shape.replace(ffn_hidden_size=2 * shape.ffn_hidden_size), PruneTarget(), seed=1)
    with pytest.raises(PlanError, match="ffn_hidden_size: plan 192 vs HF model 96"):
        prune_hf(root / "hf", plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- CLI: bad input, nothing written
@pytest.fixture(scope="module")
def cli_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_hf_model(root / "hf", num_attention_heads=8, num_key_value_heads=4)
    hf_to_megatron(root / "hf", root / "tp2", tp=2, progress=False)
    hf_to_megatron(root / "hf", root / "pp2", tp=1, pp=2, progress=False)
    other = LlamaShape(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=4,
                       kv_channels=16, vocab_size=512)
    random_plan(other, PruneTarget(ffn_hidden_size=64), seed=1).save(root / "other_plan.json")
    return root


@pytest.mark.parametrize("argv, message", [
    (["--hidden-size-remain", "100"], "hidden_size remain 100 > original 64"),
    (["--ffn-hidden-size-remain", "63"], "ffn_hidden_size remain 63 not divisible by TP 2 in balance mode"),
    (["--num-attention-heads-remain", "6", "--num-query-groups-remain", "4"],
     r"heads remain 6 not a multiple of query groups remain 4 \(heads=6, groups=4\)"),
    (["--drop-layers", "1,4"], r"drop layers \[4\] out of range: layer ids are 0-based, 0..3"),
    (["--drop-layers", "1,1"], r"drop layers \[1, 1\] repeat a layer id"),
    (["--plan", "{root}/other_plan.json"], r"another model shape \(ffn_hidden_size: plan 128 vs checkpoint 96\)"),
    (["--plan", "{root}/other_plan.json", "--hidden-size-remain", "8"], "do not also give target sizes"),
    (["--load", "{root}/pp2", "--ffn-hidden-size-remain", "64"], "pp=2; the pruner needs PP=1: reshard to PP=1"),
    (["--importance", "activation", "--calib-data", "{root}/nope.txt", "--ffn-hidden-size-remain", "64"],
     "neither a text/jsonl file nor an indexed dataset prefix"),
    (["--importance", "taylor", "--calib-data", "{root}/nope.txt", "--ffn-hidden-size-remain", "64"],
     "neither a text/jsonl file nor an indexed dataset prefix"),
    (["--num-layers-remain", "3", "--importance", "magnitude"], "needs Block Influence"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(cli_ckpt, capsys, argv, message):
    import re

    from megatron_prune.__main__ import main

    argv = [a.replace("{root}", str(cli_ckpt)) for a in argv]
    base = [] if "--load" in argv else ["--load", str(cli_ckpt / "tp2")]
    rc = main(["prune", *base, "--save", str(cli_ckpt / "out"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not (cli_ckpt / "out").exists()


def test_cli_check_only_prints_the_target_and_writes_nothing(cli_ckpt, capsys):
    from megatron_prune.__main__ import main

    rc = main(["prune", "--load", str(cli_ckpt / "tp2"), "--save", str(cli_ckpt / "out"), "--check-only",
               "--ffn-hidden-size-remain", "63", "--prune-type", "global", "--drop-layers", "0",
               "--importance", "random"])
    assert rc == 0 and "layers=3 hidden=64 heads=8/4 ffn=63" in capsys.readouterr().out
    assert not (cli_ckpt / "out").exists()


def test_cli_warns_when_transformers_5_cannot_load_the_export(cli_ckpt, capsys):
    import transformers

    from megatron_prune.__main__ import main

    rc = main(["prune", "--load", str(cli_ckpt / "tp2"), "--save", str(cli_ckpt / "out"), "--check-only",
               "--hidden-size-remain", "60", "--importance", "random"])
    assert rc == 0 and "hidden 60 is not a multiple of heads 8" in capsys.readouterr().err
    if int(transformers.__version__.split(".")[0]) >= 5:  # the reason for the warning
        with pytest.raises(Exception, match="not a multiple"):
            transformers.LlamaConfig(hidden_size=60, num_attention_heads=8, head_dim=16)


def _mapped_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (from /proc/self/smaps)."""
    import os

    total, inside = 0, False
    real = os.path.realpath(path)
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping header line
                inside = len(head) == 6 and head[5] == real
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_page_dropper_releases_mmap_pages_without_changing_data(tmp_path):
    from megatron_prune.model.dist_write import PageDropper

    ref = torch.randn(4096, 512)  # 8 MiB
    torch.save({"w": ref}, tmp_path / "f.pt")
    sd = torch.load(tmp_path / "f.pt", mmap=True, weights_only=True)
    assert torch.equal(sd["w"], ref)  # every page touched
    before = _mapped_rss_kib(tmp_path / "f.pt")
    anon = torch.ones(1024, 1024)
    drop = PageDropper(tmp_path / "f.pt")
    drop(sd["w"])
    drop(anon)  # not file-backed: must be left alone
    assert before >= 7 * 1024 and _mapped_rss_kib(tmp_path / "f.pt") < before / 4
    assert torch.equal(sd["w"], ref) and bool((anon == 1).all())
