"""Inconsistent inputs are refused with one line naming the file (issue 12, item 4): metadata vs tensors,
config.json vs tensors, duplicate tensor names, swapped rank folders, NaN / Inf weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_prune.__main__ import main
from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.consistency import RANK_RECORD
from megatron_prune.checkpoint.convert_files import hf_to_megatron, megatron_to_hf
from megatron_prune.checkpoint.errors import CheckpointError
from tests.helpers import VARIANTS, make_hf_model

RANK0 = "release/mp_rank_00/model_optim_rng.pt"
RANK1 = "release/mp_rank_01/model_optim_rng.pt"
QKV = "decoder.layers.1.self_attention.linear_qkv.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An HF model (GQA 4 heads / 2 groups, hidden 64) and its TP=2 conversion; tests work on copies."""
    root = tmp_path_factory.mktemp("consistency")
    make_hf_model(root / "hf")
    hf_to_megatron(root / "hf", root / "mg", tp=2, progress=False)
    return root


def copy(base, tmp_path, name):
    shutil.copytree(base / name, tmp_path / name)
    return tmp_path / name


def run(capsys, *argv):
    """(exit code, stderr) of the CLI; asserts the contract: a failure is exactly one `error:` line."""
    capsys.readouterr()
    rc = main([*argv, "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    if rc != 0:
        assert len(err) == 1 and err[0].startswith("error: "), err
    return rc, (err[0] if err else "")


def export(capsys, load, out):
    return run(capsys, "convert", "megatron-to-hf", "--load", str(load), "--save", str(out))


def edit_meta(root, **shape):
    meta = json.loads((root / mio.META).read_text())
    meta["shape"].update(shape)
    (root / mio.META).write_text(json.dumps(meta))


def edit_rank(path, fn):
    state = torch.load(path, weights_only=False)
    fn(state)
    torch.save(state, path)


# ----------------------------------------------------------------------------- meta vs tensors
def test_meta_num_layers_edited_is_refused_by_every_reader(base, tmp_path, capsys):
    mg = copy(base, tmp_path, "mg")
    edit_meta(mg, num_layers=3)  # the tensors still hold 4 layers: export used to drop layer 3 silently
    rc, err = export(capsys, mg, tmp_path / "out")
    assert rc == 2 and f"{mg / RANK0}: holds 4 layers, but {mg / mio.META} implies 3" in err
    assert not (tmp_path / "out").exists()
    rc, err = run(capsys, "reshard", "--load", str(mg), "--save", str(tmp_path / "re"), "--tp", "1")
    assert rc == 2 and "holds 4 layers" in err and not (tmp_path / "re").exists()
    rc, err = run(capsys, "prune", "--load", str(mg), "--save", str(tmp_path / "pr"), "--drop-layers", "1",
                  "--check-only")
    assert rc == 2 and "holds 4 layers" in err
    with pytest.raises(CheckpointError, match="holds 4 layers"):  # the loader of training and eval
        mio.load_rank(mg, 1, 0)


def test_meta_hidden_size_edited_is_refused(base, tmp_path, capsys):
    mg = copy(base, tmp_path, "mg")
    edit_meta(mg, hidden_size=60)  # would have written a config.json that disagrees with the tensors
    rc, err = export(capsys, mg, tmp_path / "out")
    assert rc == 2 and str(mg / RANK0) in err and str(mg / mio.META) in err
    assert "tensor 'embedding.word_embeddings.weight' has shape [256, 64]" in err and "implies [256, 60]" in err
    assert not (tmp_path / "out").exists()


def test_shard_of_another_tp_size_is_refused(base, tmp_path, capsys):
    mg = copy(base, tmp_path, "mg")
    hf_to_megatron(base / "hf", tmp_path / "tp1", tp=1, progress=False)
    # a TP=1 shard (whole qkv) in rank 1's folder, its args and record stripped: only the shapes can tell
    state = torch.load(tmp_path / "tp1" / RANK0, weights_only=False)
    state.pop(RANK_RECORD, None)
    state["args"].tensor_model_parallel_size = 2
    torch.save(state, mg / RANK1)
    rc, err = export(capsys, mg, tmp_path / "out")
    assert rc == 2 and f"{mg / RANK1}: tensor 'embedding.word_embeddings.weight' has shape [512, 64]" in err
    assert "implies [256, 64] for tp rank 1 of 2" in err


# ----------------------------------------------------------------------------- rank folders
def test_rank_files_record_their_rank(base):
    for tp_rank, rel in enumerate((RANK0, RANK1)):
        state = torch.load(base / "mg" / rel, weights_only=True, map_location="meta")
        assert state[RANK_RECORD] == {"tp_rank": tp_rank, "pp_rank": 0, "tp": 2, "pp": 1}


def test_swapped_rank_folders_are_refused(base, tmp_path, capsys):
    mg = copy(base, tmp_path, "mg")
    (mg / "release/mp_rank_00").rename(mg / "release/tmp")
    (mg / "release/mp_rank_01").rename(mg / "release/mp_rank_00")
    (mg / "release/tmp").rename(mg / "release/mp_rank_01")
    rc, err = export(capsys, mg, tmp_path / "out")
    assert rc == 2 and f"{mg / RANK0}: written as tp rank 1, pp rank 0 of tp=2, pp=1" in err
    assert "folder of tp rank 0" in err and not (tmp_path / "out").exists()
    rc, err = run(capsys, "reshard", "--load", str(mg), "--save", str(tmp_path / "re"), "--tp", "1")
    assert rc == 2 and "written as tp rank 1" in err


def test_rank_files_without_a_record_are_accepted(base, tmp_path, capsys):
    """Checkpoints written before rank records existed (or by Megatron-LM) load as before."""
    mg = copy(base, tmp_path, "mg")
    for rel in (RANK0, RANK1):
        edit_rank(mg / rel, lambda s: s.pop(RANK_RECORD))
    rc, _ = export(capsys, mg, tmp_path / "out")
    assert rc == 0
    a, b = load_file(base / "hf/model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- config.json vs tensors
def test_hf_config_disagreeing_with_tensors_is_refused(base, tmp_path, capsys):
    hf = copy(base, tmp_path, "hf")
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["head_dim"] == 16
    cfg["hidden_size"] = 60  # head_dim stays explicit, so nothing but the tensors can tell
    (hf / "config.json").write_text(json.dumps(cfg))
    rc, err = run(capsys, "convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(tmp_path / "out"))
    assert rc == 2 and f"{hf / 'model.safetensors'}: tensor 'model.embed_tokens.weight' has shape [512, 64]" in err
    assert f"{hf / 'config.json'} implies [512, 60]" in err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- duplicate tensor names
def test_duplicate_tensor_names_without_index_are_refused(base, tmp_path, capsys):
    hf = copy(base, tmp_path, "hf")
    key = "model.layers.0.mlp.down_proj.weight"
    stray = load_file(hf / "model.safetensors")[key]
    save_file({key: torch.zeros_like(stray)}, str(hf / "zz-stray.safetensors"))
    rc, err = run(capsys, "convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(tmp_path / "out"))
    assert rc == 2 and str(hf / "model.safetensors") in err and str(hf / "zz-stray.safetensors") in err
    assert repr(key) in err and not (tmp_path / "out").exists()


def _sharded(hf, out):
    """The model as two safetensors files plus an index (as save_pretrained writes large models)."""
    tensors = load_file(hf / "model.safetensors")
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[:10], "model-00002-of-00002.safetensors": keys[10:]}
    out.mkdir()
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, str(out / name))
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(hf / "config.json", out / "config.json")
    return tensors


def test_index_is_the_source_of_truth(base, tmp_path, capsys):
    hf = tmp_path / "sharded"
    tensors = _sharded(base / "hf", hf)
    key = "model.embed_tokens.weight"
    save_file({key: torch.zeros_like(tensors[key])}, str(hf / "zz-stray.safetensors"))  # not in the index
    rc, _ = run(capsys, "convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(tmp_path / "mg"))
    assert rc == 0
    rc, _ = export(capsys, tmp_path / "mg", tmp_path / "back")
    back = load_file(tmp_path / "back/model.safetensors")
    assert torch.equal(back[key], tensors[key])  # the stray zeros were never read


def test_index_naming_a_file_without_the_tensor_is_refused(base, tmp_path, capsys):
    hf = tmp_path / "sharded"
    _sharded(base / "hf", hf)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    key = "model.norm.weight"
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][key])
    index["weight_map"][key] = other
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, err = run(capsys, "convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(tmp_path / "out"))
    assert rc == 2 and f"{hf / other}: lacks 1 tensors that model.safetensors.index.json places there" in err


# ----------------------------------------------------------------------------- NaN / Inf
def _poison_hf(hf, key, value):
    tensors = load_file(hf / "model.safetensors")
    tensors[key][3, 5] = value
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hf_weights_are_refused(base, tmp_path, capsys, value):
    hf = copy(base, tmp_path, "hf")
    key = "model.layers.2.self_attn.k_proj.weight"
    _poison_hf(hf, key, value)
    argv = ("convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(tmp_path / "out"), "--tp", "2")
    rc, err = run(capsys, *argv)
    assert rc == 2 and f"{hf / 'model.safetensors'}: tensor {key!r} holds non-finite values" in err
    assert "--allow-non-finite" in err and not (tmp_path / "out").exists()
    rc, _ = run(capsys, *argv, "--allow-non-finite")
    assert rc == 0


def test_cast_overflow_is_refused(base, tmp_path, capsys):
    hf = copy(base, tmp_path, "hf")
    _poison_hf(hf, "model.layers.0.mlp.up_proj.weight", 1e6)  # finite in fp32, Inf in fp16
    rc, err = run(capsys, "convert", "hf-to-megatron", "--hf-dir", str(hf), "--save", str(tmp_path / "out"),
                  "--dtype", "fp16")
    assert rc == 2 and "tensor 'model.layers.0.mlp.up_proj.weight' overflows float16" in err


def test_non_finite_megatron_weights_are_refused_by_export_and_reshard(base, tmp_path, capsys):
    mg = copy(base, tmp_path, "mg")
    edit_rank(mg / RANK1, lambda s: s["model"][QKV].__setitem__((0, 0), float("nan")))
    rc, err = export(capsys, mg, tmp_path / "out")
    assert rc == 2 and f"{mg / RANK1}: tensor {QKV!r} holds non-finite values (1 NaN and 0 Inf" in err
    assert not (tmp_path / "out").exists()
    rc, err = run(capsys, "reshard", "--load", str(mg), "--save", str(tmp_path / "re"), "--tp", "1",
                  "--check-finite")
    assert rc == 2 and f"{mg / RANK1}: tensor {QKV!r} holds non-finite values" in err
    assert not (tmp_path / "re").exists()
    rc, _ = run(capsys, "reshard", "--load", str(mg), "--save", str(tmp_path / "re"), "--tp", "1")
    assert rc == 0  # bit copies by default: the NaN travels, as it would with cp
    rc, _ = run(capsys, "convert", "megatron-to-hf", "--load", str(mg), "--save", str(tmp_path / "out"),
                "--allow-non-finite")
    assert rc == 0 and torch.isnan(load_file(tmp_path / "out/model.safetensors")[
        "model.layers.1.self_attn.q_proj.weight"]).sum() == 1


def test_non_finite_weights_are_refused_by_prune_hf(base, tmp_path, capsys):
    from megatron_prune.prune.random_plan import random_plan
    from megatron_prune.prune.select import PruneTarget

    hf = copy(base, tmp_path, "hf")
    _poison_hf(hf, "model.layers.3.mlp.gate_proj.weight", float("nan"))
    random_plan(mio.read_meta(base / "mg").shape, PruneTarget(ffn_hidden_size=64), seed=1).save(tmp_path / "p.json")
    argv = ("prune-hf", "--hf-dir", str(hf), "--plan", str(tmp_path / "p.json"), "--save", str(tmp_path / "out"))
    rc, err = run(capsys, *argv)
    assert rc == 2 and f"{hf / 'model.safetensors'}: tensor 'model.layers.3.mlp.gate_proj.weight' holds " \
                       "non-finite values" in err
    assert not (tmp_path / "out").exists()
    rc, _ = run(capsys, *argv, "--allow-non-finite")
    assert rc == 0


def test_prune_refuses_non_finite_pruned_tensors(base):
    """The torchrun pruner's check (run inside write_distributed, so any rank's error reaches every rank)."""
    from megatron_prune.prune.run import check_finite_state

    state = mio.load_rank(base / "mg", 1, 0)
    sd = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state["model"].items()}
    check_finite_state(base / "mg" / RANK1, sd)
    sd[QKV][2, 2] = float("-inf")
    with pytest.raises(CheckpointError, match=f"{RANK1}: tensor {QKV!r} \\(after pruning\\) holds non-finite values "
                                              "\\(0 NaN and 1 Inf"):
        check_finite_state(base / "mg" / RANK1, sd)


def test_a_string_rank_record_does_not_disable_the_rank_check(tmp_path):
    """Issue 26: a rank record that is not a mapping of integers (here a string) used to skip the folder check."""
    make_hf_model(tmp_path / "hf", **VARIANTS["gqa"])
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=2, progress=False)
    paths = [tmp_path / f"mg/release/mp_rank_0{r}/model_optim_rng.pt" for r in (0, 1)]
    states = [torch.load(p, weights_only=False) for p in paths]
    for p, state in zip(reversed(paths), states):  # swap the two rank files, with string records
        state[RANK_RECORD] = "tp_rank=0"
        torch.save(state, p)
    with pytest.raises(CheckpointError, match="invalid rank record"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
