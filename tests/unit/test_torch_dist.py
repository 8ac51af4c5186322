"""torch_dist in and out (megatron-core's dist_checkpointing): every format change has its inverse and is
bit-exact, and the trust rules of the legacy format hold for it (one-line errors for missing or truncated chunk
files, a foreign metadata.json, a meta that disagrees with the tensors, planted pickles; no partial output).
References: the HF source tensors and the legacy rank files (independent of the torch_dist code)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_prune.__main__ import main
from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.convert_files import hf_to_megatron, megatron_to_hf
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.checkpoint.keys import to_local_names
from megatron_prune.checkpoint.reshard_files import reshard
from tests.helpers import VARIANTS, make_hf_model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("torch_dist")
    make_hf_model(root / "hf", **VARIANTS["gqa"])
    make_hf_model(root / "hf_tied", **VARIANTS["tied"])
    hf_to_megatron(root / "hf", root / "dist", tp=2, progress=False, ckpt_format="torch_dist")
    hf_to_megatron(root / "hf", root / "legacy_pp2", tp=2, pp=2, progress=False)
    hf_to_megatron(root / "hf_tied", root / "tied_pp2", tp=2, pp=2, progress=False)
    return root


def _cli(*argv) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, err.getvalue()


def _equal_dirs(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_hf_to_torch_dist_and_back_is_bit_exact(ckpts, tmp_path):
    root = ckpts / "dist"
    assert mio.checkpoint_format(root) == "torch_dist"
    files = {p.name for p in (root / "release").iterdir()}
    assert {"metadata.json", ".metadata", "common.pt"} <= files and not any(f.startswith("mp_rank") for f in files)
    assert not list(root.glob(".legacy-staging*")) and not list((root / "release").glob(".legacy-staging*"))
    megatron_to_hf(root, tmp_path / "back", progress=False)
    assert _equal_dirs(ckpts / "hf", tmp_path / "back")


@pytest.mark.parametrize("name", ["legacy_pp2", "tied_pp2"])
def test_legacy_to_torch_dist_and_back_is_bit_exact(ckpts, tmp_path, name):
    src = ckpts / name
    reshard(src, tmp_path / "dist", tp=2, pp=2, progress=False, ckpt_format="torch_dist")
    reshard(tmp_path / "dist", tmp_path / "back", tp=2, pp=2, progress=False)
    for pp_rank in range(2):
        for tp_rank in range(2):
            want = to_local_names(mio.load_rank(src, tp_rank, pp_rank)["model"])
            got = to_local_names(mio.load_rank(tmp_path / "back", tp_rank, pp_rank)["model"])
            assert want.keys() == got.keys()
            assert all(torch.equal(got[k], v) for k, v in want.items() if isinstance(v, torch.Tensor))


def test_torch_dist_is_read_at_any_tp_and_pp(ckpts):
    """Written at TP=2 x PP=1, read at TP=2 x PP=2: the legacy converter's shards of those sizes, exactly; and at
    TP=1 x PP=2."""
    ck = mio.open_checkpoint(ckpts / "dist", 2, 2)
    for pp_rank in range(2):
        for tp_rank in range(2):
            want = to_local_names(mio.load_rank(ckpts / "legacy_pp2", tp_rank, pp_rank)["model"])
            got = ck.load_rank(tp_rank, pp_rank)["model"]
            assert {k for k, v in want.items() if isinstance(v, torch.Tensor)} == set(got)
            assert all(torch.equal(got[k], want[k]) for k in got)
    ck = mio.open_checkpoint(ckpts / "dist", 1, 2)
    assert ck.load_rank(0, 1)["model"]["output_layer.weight"].shape[0] == ck.meta.padded_vocab_size


def test_missing_and_truncated_chunk_files_are_one_line(ckpts, tmp_path):
    shutil.copytree(ckpts / "dist", tmp_path / "missing")
    chunk = sorted((tmp_path / "missing" / "release").glob("*.distcp"))[-1]
    chunk.unlink()
    rc, err = _cli("convert", "megatron-to-hf", "--load", str(tmp_path / "missing"), "--save", str(tmp_path / "o1"))
    assert rc == 2 and err.count("\n") == 1 and chunk.name in err and "missing" in err
    shutil.copytree(ckpts / "dist", tmp_path / "cut")
    chunk = sorted((tmp_path / "cut" / "release").glob("*.distcp"))[0]
    os.truncate(chunk, chunk.stat().st_size // 2)
    rc, err = _cli("reshard", "--load", str(tmp_path / "cut"), "--save", str(tmp_path / "o2"), "--tp", "1")
    assert rc == 2 and err.count("\n") == 1 and "truncated" in err and chunk.name in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_metadata_json_of_another_backend_is_one_line(ckpts, tmp_path):
    shutil.copytree(ckpts / "dist", tmp_path / "zarr")
    (tmp_path / "zarr/release/metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    rc, err = _cli("convert", "megatron-to-hf", "--load", str(tmp_path / "zarr"), "--save", str(tmp_path / "o"))
    assert rc == 2 and err.count("\n") == 1 and "'zarr', not 'torch_dist'" in err


def test_meta_is_checked_against_the_global_tensors(ckpts, tmp_path):
    shutil.copytree(ckpts / "dist", tmp_path / "edited")
    meta = json.loads((tmp_path / "edited/megatron_prune.json").read_text())
    meta["shape"]["ffn_hidden_size"] = 64  # the tensors hold 96
    (tmp_path / "edited/megatron_prune.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="linear_fc1.weight' has global shape .* implies"):
        mio.open_checkpoint(tmp_path / "edited")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickles_are_refused_and_never_run(ckpts, tmp_path):
    marker = tmp_path / "pwned"
    shutil.copytree(ckpts / "dist", tmp_path / "common")
    common = tmp_path / "common/release/common.pt"
    torch.save({"args": _Payload(marker), "iteration": 0}, common)
    rc, err = _cli("convert", "megatron-to-hf", "--load", str(tmp_path / "common"), "--save", str(tmp_path / "o1"))
    assert rc == 2 and "posix.system" in err and err.count("\n") == 1
    shutil.copytree(ckpts / "dist", tmp_path / "index")
    (tmp_path / "index/release/.metadata").write_bytes(pickle.dumps(_Payload(marker)))  # torch DCP: plain pickle
    rc, err = _cli("reshard", "--load", str(tmp_path / "index"), "--save", str(tmp_path / "o2"), "--tp", "1")
    assert rc == 2 and "posix.system" in err and err.count("\n") == 1
    assert not marker.exists()


def test_output_inside_the_input_is_refused(ckpts):
    rc, err = _cli("reshard", "--load", str(ckpts / "dist"), "--save", str(ckpts / "dist" / "sub"), "--tp", "1",
                   "--ckpt-format", "torch_dist")
    assert rc == 2 and "inside" in err and not (ckpts / "dist" / "sub").exists()


def test_a_failed_torch_dist_save_leaves_nothing(ckpts, tmp_path, monkeypatch):
    import errno

    from megatron_prune.checkpoint import dist_ckpt

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(dist_ckpt, "save", full_disk)
    rc, err = _cli("reshard", "--load", str(ckpts / "legacy_pp2"), "--save", str(tmp_path / "out"), "--tp", "1",
                   "--ckpt-format", "torch_dist", "--no-progress")
    assert rc == 2 and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary sibling
