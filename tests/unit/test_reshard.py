"""Resharding: bit-exact against the converter's direct output and back to the source at every TP/PP layout,
vocabulary re-padding, tied embeddings with PP>1, uneven (global-mode) sources, training checkpoints, bad input.

References are independent of the resharder: the converter's own output at the target layout, the source
checkpoint itself, and HF weights cut with plain tensor indexing for the uneven case."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_prune.__main__ import main
from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.convert_files import hf_to_megatron, megatron_to_hf
from megatron_prune.checkpoint.reshard import PAD, Piece, plan_pieces
from megatron_prune.checkpoint.reshard_files import reshard
from tests.helpers import make_hf_model
from tests.unit.test_convert import hf_tensors

ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = [(tp, pp) for tp in (1, 2, 4) for pp in (1, 2)]
# GQA and tied (with PP>1 the last stage keeps its own copy of the embedding as output weight); vocab 1100 pads
# to a multiple of 128 * TP: 1152, 1280, 1536 at TP 1, 2, 4, so every TP change re-pads.
MODEL = dict(num_attention_heads=8, num_key_value_heads=4, vocab_size=1100, tie_word_embeddings=True)
PADDED = {1: 1152, 2: 1280, 4: 1536}


def rank_dicts(root):
    meta = mio.read_meta(root)
    return {(t, p): mio.load_rank(root, t, p, meta)["model"] for p in range(meta.pp) for t in range(meta.tp)}


def assert_same_checkpoint(a, b):
    ra, rb = rank_dicts(a), rank_dicts(b)
    assert ra.keys() == rb.keys()
    for rank in ra:
        assert list(ra[rank]) == list(rb[rank]), rank
        for k, v in ra[rank].items():
            w = rb[rank][k]
            assert (v is None and w is None) or (v.dtype == w.dtype and torch.equal(v, w)), (rank, k)
    ma, mb = mio.read_meta(a), mio.read_meta(b)
    assert (ma.shape, ma.tp, ma.pp, ma.padded_vocab_size, ma.te_names) == \
        (mb.shape, mb.tp, mb.pp, mb.padded_vocab_size, mb.te_names)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    make_hf_model(root / "hf", **MODEL)
    (root / "hf/tokenizer.json").write_text('{"fake": "tokenizer"}')
    for tp, pp in LAYOUTS:
        hf_to_megatron(root / "hf", root / f"tp{tp}pp{pp}", tp=tp, pp=pp, progress=False)
    return root


@pytest.mark.parametrize("src,dst", list(itertools.permutations(LAYOUTS, 2)), ids=str)
def test_reshard_equals_direct_conversion_and_back(converted, tmp_path, src, dst):
    meta = reshard(converted / f"tp{src[0]}pp{src[1]}", tmp_path / "out", tp=dst[0], pp=dst[1], progress=False)
    assert_same_checkpoint(tmp_path / "out", converted / f"tp{dst[0]}pp{dst[1]}")
    assert meta.padded_vocab_size == PADDED[dst[0]] and meta.rank_sizes is None
    assert [h["op"] for h in mio.read_meta(tmp_path / "out").history] == ["convert", "reshard"]
    assert meta.history[-1]["source_tp"] == src[0] and meta.history[-1]["source_pp"] == src[1]
    assert (tmp_path / "out/latest_checkpointed_iteration.txt").read_text() == "release"
    assert (tmp_path / "out/tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    reshard(tmp_path / "out", tmp_path / "back", tp=src[0], pp=src[1], progress=False)
    assert_same_checkpoint(tmp_path / "back", converted / f"tp{src[0]}pp{src[1]}")


def test_vocab_pieces_of_a_repadded_target():
    """TP=1 source (1100 rows of 1152) -> TP=4 with 1536 padded rows, 384 per rank (counted by hand)."""
    from megatron_prune.config.shape import LlamaShape

    shape = LlamaShape(num_layers=1, hidden_size=8, ffn_hidden_size=8, num_attention_heads=2, num_query_groups=2,
                       kv_channels=4, vocab_size=1100)
    plan = [plan_pieces("embedding.word_embeddings.weight", "vocab", [(1152, 8)], shape, 4, r, 1536)
            for r in range(4)]
    assert plan[0] == (0, (Piece(0, 0, 384),), (384, 8))
    assert plan[2] == (0, (Piece(0, 768, 1100), Piece(PAD, 0, 52)), (384, 8))
    assert plan[3] == (0, (Piece(PAD, 0, 384),), (384, 8))


def test_te_names_and_crc32_path(converted, tmp_path, monkeypatch):
    """Transformer-Engine key spelling is kept; with MEGATRON_PRUNE_CRC32=1 (in-memory writer) the zip CRCs hold."""
    hf_to_megatron(converted / "hf", tmp_path / "te-tp2", tp=2, te_names=True, progress=False)
    hf_to_megatron(converted / "hf", tmp_path / "te-tp1pp2", tp=1, pp=2, te_names=True, progress=False)
    reshard(tmp_path / "te-tp2", tmp_path / "te-out", tp=1, pp=2, progress=False)
    assert_same_checkpoint(tmp_path / "te-out", tmp_path / "te-tp1pp2")
    monkeypatch.setenv("MEGATRON_PRUNE_CRC32", "1")
    reshard(converted / "tp2pp1", tmp_path / "crc", tp=4, pp=2, progress=False)
    assert_same_checkpoint(tmp_path / "crc", converted / "tp4pp2")
    assert zipfile.ZipFile(tmp_path / "crc/release/mp_rank_03_001/model_optim_rng.pt").testzip() is None


def test_non_dividing_tp_sizes_untied(tmp_path):
    """TP 2 <-> 3 (neither divides the other), untied output layer; still bit-exact."""
    make_hf_model(tmp_path / "hf", num_attention_heads=12, num_key_value_heads=6, hidden_size=96, vocab_size=1000)
    for tp, pp in ((2, 2), (3, 2), (2, 1)):
        hf_to_megatron(tmp_path / "hf", tmp_path / f"tp{tp}pp{pp}", tp=tp, pp=pp, progress=False)
    reshard(tmp_path / "tp2pp2", tmp_path / "to3", tp=3, pp=2, progress=False)
    reshard(tmp_path / "tp3pp2", tmp_path / "to2", tp=2, pp=1, progress=False)
    assert_same_checkpoint(tmp_path / "to3", tmp_path / "tp3pp2")
    assert_same_checkpoint(tmp_path / "to2", tmp_path / "tp2pp1")


# ----------------------------------------------------------------------------- uneven (global-mode) sources
# heads 12, groups 6 (2 heads each), head_dim 16, hidden 96, ffn 96: a TP=2 rank holds 3 groups, 48 channels.
# TP rank 0 loses its local groups 0 and 2 (global 0 and 2); rank 1 its last 8 channels (global 88-95). The cut
# model (8 heads, 4 groups, ffn 88) splits evenly over TP 1, 2 and 4, so the resharder must move data across
# ranks. transformers 5 wants hidden % heads == 0 before and after the cut.
UNEVEN_MODEL = dict(num_attention_heads=12, num_key_value_heads=6, hidden_size=96, intermediate_size=96,
                    vocab_size=1000)
HPG, D, HIDDEN = 2, 16, 96
DROP_GROUPS, DROP_FFN = [0, 2], list(range(40, 48))


def make_uneven(tp2_root: Path, out: Path) -> None:
    """Copy a TP=2 checkpoint with the cut above applied to its shards (plain indexing, no project code)."""
    meta = mio.read_meta(tp2_root)
    sds = [dict(mio.load_rank(tp2_root, r, 0, meta)["model"]) for r in range(2)]
    keep_g = [g for g in range(3) if g not in DROP_GROUPS]
    keep_f = [c for c in range(48) if c not in DROP_FFN]
    for i in range(meta.shape.num_layers):
        p = f"decoder.layers.{i}."
        qkv = sds[0][p + "self_attention.linear_qkv.weight"].view(3, (HPG + 2) * D, HIDDEN)
        sds[0][p + "self_attention.linear_qkv.weight"] = qkv[keep_g].reshape(-1, HIDDEN).clone()
        proj = sds[0][p + "self_attention.linear_proj.weight"].view(HIDDEN, 3, HPG * D)
        sds[0][p + "self_attention.linear_proj.weight"] = proj[:, keep_g].reshape(HIDDEN, -1).clone()
        gate, up = sds[1][p + "mlp.linear_fc1.weight"].chunk(2)
        sds[1][p + "mlp.linear_fc1.weight"] = torch.cat([gate[keep_f], up[keep_f]])
        sds[1][p + "mlp.linear_fc2.weight"] = sds[1][p + "mlp.linear_fc2.weight"][:, keep_f].clone()
    shape = meta.shape.replace(num_query_groups=4, num_attention_heads=8, ffn_hidden_size=88)
    layers = shape.num_layers
    new = meta.replace(shape=shape, rank_sizes={"groups": [[1, 3]] * layers, "ffn": [[48, 40]] * layers})
    for r in range(2):
        mio.save_rank(out, "release", r, 0, 1, mio.rank_state(sds[r], mio.megatron_args(new), 0))
    mio.write_meta(out, new)
    mio.write_tracker(out, "release")


def cut_hf(hf_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """The same cut on the HF weights, in global indices: groups 0 and 2, FFN channels 88-95."""
    sd = load_file(hf_dir / "model.safetensors")
    cfg = json.loads((hf_dir / "config.json").read_text())
    keep_q = [r for r in range(12 * D) if r // (HPG * D) not in DROP_GROUPS]
    keep_kv = [r for r in range(6 * D) if r // D not in DROP_GROUPS]
    keep_f = [c for c in range(96) if c - 48 not in DROP_FFN]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for k, rows in (("q_proj", keep_q), ("k_proj", keep_kv), ("v_proj", keep_kv)):
            sd[p + f"self_attn.{k}.weight"] = sd[p + f"self_attn.{k}.weight"][rows]
        sd[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][:, keep_q]
        for k in ("gate_proj", "up_proj"):
            sd[p + f"mlp.{k}.weight"] = sd[p + f"mlp.{k}.weight"][keep_f]
        sd[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][:, keep_f]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    cfg.update(num_attention_heads=8, num_key_value_heads=4, intermediate_size=88)
    (out / "config.json").write_text(json.dumps(cfg))
    return sd


def test_uneven_source_merges_and_resplits_evenly(tmp_path):
    make_hf_model(tmp_path / "hf", **UNEVEN_MODEL)
    hf_to_megatron(tmp_path / "hf", tmp_path / "tp2", tp=2, progress=False)
    make_uneven(tmp_path / "tp2", tmp_path / "uneven")
    expected = cut_hf(tmp_path / "hf", tmp_path / "cut")
    megatron_to_hf(tmp_path / "uneven", tmp_path / "export", progress=False)  # the foundation's uneven merge
    got = hf_tensors(tmp_path / "export")
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    for tp, pp in ((2, 1), (1, 2), (4, 1)):
        out = reshard(tmp_path / "uneven", tmp_path / f"even-tp{tp}pp{pp}", tp=tp, pp=pp, progress=False)
        assert out.rank_sizes is None and out.history[-1]["uneven_source"]
        hf_to_megatron(tmp_path / "cut", tmp_path / f"ref-tp{tp}pp{pp}", tp=tp, pp=pp, progress=False)
        assert_same_checkpoint(tmp_path / f"even-tp{tp}pp{pp}", tmp_path / f"ref-tp{tp}pp{pp}")


# ----------------------------------------------------------------------------- training checkpoints
def make_training_checkpoint(src: Path, out: Path, iteration: int = 10) -> None:
    """A converted checkpoint rewritten the way training saves: iter_0000010/, optimizer/scheduler/RNG state."""
    meta = mio.read_meta(src)
    for p in range(meta.pp):
        for t in range(meta.tp):
            state = dict(mio.load_rank(src, t, p, meta))
            state.update(iteration=iteration, optimizer={"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []},
                         opt_param_scheduler={"num_steps": 80}, rng_state={"torch": torch.get_rng_state()},
                         consumed_train_samples=80)
            path = mio.save_rank(out, iteration, t, p, meta.pp, state)
            torch.save([{"exp_avg": torch.zeros(4)}], path.with_name("distrib_optim_dp000.pt"))
    mio.write_meta(out, meta.with_history("train", iterations=iteration))
    mio.write_tracker(out, iteration)


def test_training_checkpoint_weights_resharded_optimizer_dropped(converted, tmp_path, capsys):
    make_training_checkpoint(converted / "tp2pp2", tmp_path / "trained")
    capsys.readouterr()
    rc = main(["reshard", "--no-progress", "--load", str(tmp_path / "trained"), "--save", str(tmp_path / "out"),
               "--tp", "4"])
    err = capsys.readouterr().err
    assert rc == 0 and "optimizer, scheduler and RNG state were NOT carried over" in err
    assert_same_checkpoint(tmp_path / "out", converted / "tp4pp1")
    meta = mio.read_meta(tmp_path / "out")
    assert [h["op"] for h in meta.history] == ["convert", "train", "reshard"]
    assert meta.history[-1]["source_iteration"] == 10
    assert (tmp_path / "out/latest_checkpointed_iteration.txt").read_text() == "release"
    assert not list((tmp_path / "out").rglob("distrib_optim*"))


# ----------------------------------------------------------------------------- bad input: error, nothing written
def run_cli(capsys, src, out, *argv):
    capsys.readouterr()
    rc = main(["reshard", "--no-progress", "--load", str(src), "--save", str(out), *argv])
    err = capsys.readouterr().err
    assert not out.exists(), "nothing may be written on error"
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def copy_source(converted, tmp_path, layout="tp2pp1") -> Path:
    shutil.copytree(converted / layout, tmp_path / "src")
    return tmp_path / "src"


def test_missing_rank_file(converted, tmp_path, capsys):
    src = copy_source(converted, tmp_path)
    (src / "release/mp_rank_01/model_optim_rng.pt").unlink()
    err = run_cli(capsys, src, tmp_path / "out", "--tp", "1")
    assert "mp_rank_01/model_optim_rng.pt: missing rank file" in err


def test_truncated_rank_file(converted, tmp_path, capsys):
    src = copy_source(converted, tmp_path)
    path = src / "release/mp_rank_01/model_optim_rng.pt"
    os.truncate(path, path.stat().st_size // 2)
    err = run_cli(capsys, src, tmp_path / "out", "--tp", "4")
    assert "mp_rank_01/model_optim_rng.pt: " in err


def test_ranks_from_different_iterations_or_shapes(converted, tmp_path, capsys):
    src = copy_source(converted, tmp_path)
    path = src / "release/mp_rank_01/model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["iteration"] = 7
    torch.save(state, path)
    err = run_cli(capsys, src, tmp_path / "out", "--tp", "1")
    assert "mp_rank_01/model_optim_rng.pt: iteration 7 differs from the tracker's release" in err
    state["iteration"] = 0
    state["args"].hidden_size = 128
    torch.save(state, path)
    err = run_cli(capsys, src, tmp_path / "out", "--tp", "1")
    assert "mp_rank_01/model_optim_rng.pt: model args" in err and "differ from" in err


def test_shard_inconsistent_with_shape(converted, tmp_path, capsys):
    """A rank whose qkv lost a query group while meta and args still say 4 groups."""
    src = copy_source(converted, tmp_path)
    path = src / "release/mp_rank_01/model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    key = "decoder.layers.2.self_attention.linear_qkv.weight"
    state["model"][key] = state["model"][key][:-64].clone()  # one group: (2 heads + k + v) * 16 rows
    torch.save(state, path)
    err = run_cli(capsys, src, tmp_path / "out", "--tp", "1")
    # the shared consistency check names the rank file and the shape the meta implies for it
    assert "mp_rank_01/model_optim_rng.pt: tensor 'decoder.layers.2.self_attention.linear_qkv.weight' has shape " \
           "[64, 64]" in err and "implies [128, 64] for tp rank 1 of 2" in err
    assert "groups=4" in err


@pytest.mark.parametrize("tp,pp,msg", [(3, 1, "TP 3 does not divide 8 heads / 4 query groups: use TP 1, 2 or 4"),
                                       (8, 1, "TP 8 does not divide 8 heads / 4 query groups: use TP 1, 2 or 4"),
                                       (1, 3, "PP 3 does not divide 4 layers: use PP 1, 2 or 4")])
def test_target_layout_must_divide_the_shape(converted, tmp_path, capsys, tp, pp, msg):
    err = run_cli(capsys, converted / "tp2pp1", tmp_path / "out", "--tp", str(tp), "--pp", str(pp))
    assert f"cannot reshard to tp={tp}, pp={pp}: {msg}" in err


# ----------------------------------------------------------------------------- scripts/transfer.sh
def test_transfer_script(converted, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    helptext = subprocess.run(["bash", str(ROOT / "scripts/transfer.sh"), "--help"], env=env, capture_output=True,
                              text=True, check=True).stdout
    assert "LOAD" in helptext and "--tp TP" in helptext
    env.update(LOAD=str(converted / "tp1pp2"), SAVE=str(tmp_path / "out"), TP="2")
    subprocess.run(["bash", str(ROOT / "scripts/transfer.sh"), "--no-progress"], env=env, check=True,
                   capture_output=True)
    assert_same_checkpoint(tmp_path / "out", converted / "tp2pp1")
