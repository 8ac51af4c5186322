"""Resharding: bit-exact against direct conversion at every layout, uneven sources, bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_prune.__main__ import main
from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.convert_files import hf_to_megatron, megatron_to_hf
from megatron_prune.checkpoint.reshard_files import reshard
from tests.helpers import make_hf_model
from tests.reshard_helpers import UNEVEN_MODEL, expected_uneven_hf, make_uneven
from tests.unit.test_convert import hf_tensors

LAYOUTS = [(tp, pp) for tp in (1, 2, 4) for pp in (1, 2)]
MODEL = dict(num_attention_heads=8, num_key_value_heads=4, vocab_size=1000, tie_word_embeddings=True)


def rank_dicts(root):
    meta = mio.read_meta(root)
    return {(t, p): mio.load_rank(root, t, p, meta)["model"] for p in range(meta.pp) for t in range(meta.tp)}


def assert_same_checkpoint(a, b):
    ra, rb = rank_dicts(a), rank_dicts(b)
    assert ra.keys() == rb.keys()
    for rank in ra:
        assert ra[rank].keys() == rb[rank].keys(), rank
        for k, v in ra[rank].items():
            w = rb[rank][k]
            assert (v is None and w is None) or (v.dtype == w.dtype and torch.equal(v, w)), (rank, k)
    ma, mb = mio.read_meta(a), mio.read_meta(b)
    assert (ma.shape, ma.tp, ma.pp, ma.padded_vocab_size) == (mb.shape, mb.tp, mb.pp, mb.padded_vocab_size)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    make_hf_model(root / "hf", **MODEL)
    for tp, pp in LAYOUTS:
        hf_to_megatron(root / "hf", root / f"tp{tp}pp{pp}", tp=tp, pp=pp, progress=False)
    return root


@pytest.mark.parametrize("src,dst", list(itertools.permutations(LAYOUTS, 2)), ids=str)
def test_reshard_equals_direct_conversion(converted, tmp_path, src, dst):
    out = tmp_path / "out"
    meta = reshard(converted / f"tp{src[0]}pp{src[1]}", out, tp=dst[0], pp=dst[1], progress=False)
    assert_same_checkpoint(out, converted / f"tp{dst[0]}pp{dst[1]}")
    assert meta.history[-1]["op"] == "reshard" and meta.history[-1]["source_tp"] == src[0]
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"


def test_round_trip_back_to_source(converted, tmp_path):
    reshard(converted / "tp4pp2", tmp_path / "a", tp=1, pp=1, progress=False)
    reshard(tmp_path / "a", tmp_path / "b", tp=4, pp=2, progress=False)
    assert_same_checkpoint(tmp_path / "b", converted / "tp4pp2")


def test_uneven_source_merges_and_resplits(tmp_path):
    make_hf_model(tmp_path / "hf", **UNEVEN_MODEL)
    hf_to_megatron(tmp_path / "hf", tmp_path / "tp2", tp=2, progress=False)
    make_uneven(tmp_path / "tp2", tmp_path / "uneven")
    expected = expected_uneven_hf(tmp_path / "hf", tmp_path / "expected")
    megatron_to_hf(tmp_path / "uneven", tmp_path / "export", progress=False)
    out = reshard(tmp_path / "uneven", tmp_path / "even", tp=1, progress=False)
    assert out.rank_sizes is None and out.shape.num_query_groups == 3 and out.history[-1]["uneven_source"]
    megatron_to_hf(tmp_path / "even", tmp_path / "even-hf", progress=False)
    for d in ("export", "even-hf"):
        got = hf_tensors(tmp_path / d)
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected), d


# ----------------------------------------------------------------------------- bad input
def run_cli(capsys, *argv):
    capsys.readouterr()
    rc = main(["reshard", "--no-progress", *argv])
    return rc, capsys.readouterr().err


def test_missing_rank_file(converted, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(converted / "tp2pp1", src)
    (src / "release/mp_rank_01/model_optim_rng.pt").unlink()
    rc, err = run_cli(capsys, "--load", str(src), "--save", str(tmp_path / "out"), "--tp", "1")
    assert rc == 2 and "mp_rank_01/model_optim_rng.pt: missing rank file" in err
    assert not (tmp_path / "out").exists()


def test_ranks_from_different_iterations_or_shapes(converted, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(converted / "tp2pp1", src)
    path = src / "release/mp_rank_01/model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["iteration"] = 7
    torch.save(state, path)
    rc, err = run_cli(capsys, "--load", str(src), "--save", str(tmp_path / "out"), "--tp", "1")
    assert rc == 2 and "mp_rank_01/model_optim_rng.pt: iteration 7 differs" in err
    state["iteration"] = 0
    state["args"].hidden_size = 128
    torch.save(state, path)
    rc, err = run_cli(capsys, "--load", str(src), "--save", str(tmp_path / "out"), "--tp", "1")
    assert rc == 2 and "mp_rank_01/model_optim_rng.pt: model args" in err and "differ" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tp,msg", [(3, "heads 8 not divisible by TP 3"), (8, "query groups 4 not divisible by TP 8")])
def test_target_tp_must_divide_heads_and_groups(converted, tmp_path, capsys, tp, msg):
    rc, err = run_cli(capsys, "--load", str(converted / "tp2pp1"), "--save", str(tmp_path / "out"), "--tp", str(tp))
    assert rc == 2 and msg in err and f"cannot reshard to tp={tp}" in err
    assert not (tmp_path / "out").exists()


def test_non_dividing_tp_sizes_use_full_tensors(tmp_path):
    """TP 2 <-> 3 (neither divides the other) goes through full HF-order tensors; still bit-exact."""
    make_hf_model(tmp_path / "hf", num_attention_heads=12, num_key_value_heads=6, hidden_size=96, vocab_size=1000)
    for tp in (2, 3):
        hf_to_megatron(tmp_path / "hf", tmp_path / f"tp{tp}", tp=tp, pp=2, progress=False)
    reshard(tmp_path / "tp2", tmp_path / "to3", tp=3, pp=2, progress=False)
    reshard(tmp_path / "tp3", tmp_path / "to2", tp=2, pp=1, progress=False)
    hf_to_megatron(tmp_path / "hf", tmp_path / "tp2pp1", tp=2, pp=1, progress=False)
    assert_same_checkpoint(tmp_path / "to3", tmp_path / "tp3")
    assert_same_checkpoint(tmp_path / "to2", tmp_path / "tp2pp1")
