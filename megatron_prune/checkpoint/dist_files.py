"""File drivers between the legacy rank-file layout and torch_dist, each with bounded memory in one process.

- `write_legacy_from_dist`: a torch_dist checkpoint -> legacy rank files at any (tp, pp): each target rank file is
  written as a skeleton (zip records and pickle, holes for the bytes), then filled tensor by tensor from a
  `StageReader` (one layer of one rank in memory).
- `legacy_to_dist`: legacy rank files with even shards (e.g. just written into a staging folder) -> a torch_dist
  iteration directory, saved by megatron-core's dist_checkpointing.save with every tensor memory-mapped from the rank
  files (no copy in memory; fc1's gate and up halves are mapped separately, since megatron-core's writer copies
  tensors that are views of a larger buffer).

Single-process writers of torch_dist (convert, reshard, prune-vocab) write the legacy rank files into a staging
folder inside their temporary output and convert them: one more write of the bytes, and memory stays bounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_prune.checkpoint import dist_ckpt
from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.byteio import (TensorRef, as_bytes, fill_rank_file, pwrite_all, read_refs,
                                              save_rank_skeleton)
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.checkpoint.keys import stage_extra_state_keys, stage_tensor_maps, to_te_names

STAGING = ".legacy-staging"  # inside a temporary output: the legacy rank files a torch_dist output is made from
SOURCE_STAGING = ".source-staging"  # inside a temporary output: a torch_dist input as rank files


# ----------------------------------------------------------------------------- torch_dist -> legacy rank files
def rank_names(meta: mio.CheckpointMeta, pp_rank: int) -> dict[str, str | None]:
    """Output key -> local-spec key (None for `_extra_state` entries), in the converter's order and spelling."""
    s = meta.shape
    local = {k: k for k, _, _ in stage_tensor_maps(s.num_layers, meta.pp, pp_rank, s.tie_word_embeddings)}
    local |= {k: None for k in stage_extra_state_keys(s.num_layers, meta.pp, pp_rank)}
    return to_te_names(local) if meta.te_names else local


def write_legacy_from_dist(ck: mio.OpenCheckpoint, out: Path, dst: mio.CheckpointMeta, args, bar) -> list[Path]:
    """Every rank file of `dst` (its tp, pp) from the torch_dist checkpoint `ck`; returns their paths."""
    index = dist_ckpt.read_index(ck.folder)
    view = ck.meta.at(dst.tp, dst.pp)
    paths = []
    for pp_rank in range(dst.pp):
        for tp_rank in range(dst.tp):
            pieces = dist_ckpt.rank_pieces(index, view.shape, dst.tp, dst.pp, tp_rank, pp_rank, dst.padded_vocab_size)
            reader = dist_ckpt.StageReader(index, pieces)
            bar.set_postfix_str(f"rank tp{tp_rank}" + (f" pp{pp_rank}" if dst.pp > 1 else ""))
            paths.append(_write_rank(out, tp_rank, pp_rank, reader, index, dst, args, bar))
    return paths


def _write_rank(out: Path, tp_rank: int, pp_rank: int, reader: dist_ckpt.StageReader, index: dist_ckpt.DistIndex,
                dst: mio.CheckpointMeta, args, bar) -> Path:
    specs = {name: None if key is None else (reader.shape(key), reader.dtype(key))
             for name, key in rank_names(dst, pp_rank).items()}
    path, written = save_rank_skeleton(out, tp_rank, pp_rank, dst.pp, specs, args)
    with fill_rank_file(path) as fd:
        for key in reader:  # stage order: one layer read at a time
            t = reader[key].contiguous()
            ref = written[key]
            if tuple(t.shape) != ref.shape or t.dtype != ref.dtype:
                raise CheckpointError(f"{index.path}: {key} read as {tuple(t.shape)} {t.dtype}, expected "
                                      f"{ref.shape} {ref.dtype}")
            pwrite_all(fd, as_bytes(t), ref.offset)
            bar.update(ref.nbytes)
    return path


# ----------------------------------------------------------------------------- legacy rank files -> torch_dist
def _mapped(ref: TensorRef, offset: int = 0, rows: int | None = None) -> torch.Tensor:
    """A tensor backed by a private mapping of its bytes in the rank file (rows [offset, offset+rows) of it)."""
    row_bytes = ref.nbytes // ref.shape[0] if ref.shape and ref.shape[0] else ref.nbytes
    rows = ref.shape[0] - offset if rows is None else rows
    shape = (rows, *ref.shape[1:]) if ref.shape else ()
    if 0 in shape:
        return torch.empty(shape, dtype=ref.dtype)
    np_dtype = torch.empty(0, dtype=ref.dtype).numpy().dtype if ref.dtype != torch.bfloat16 else np.uint16
    arr = np.memmap(ref.path, dtype=np_dtype, mode="c", offset=ref.offset + offset * row_bytes, shape=shape)
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if ref.dtype == torch.bfloat16 else t


def mapped_rank(path: Path, meta: mio.CheckpointMeta) -> dict[str, Any]:
    """{local key: tensor or (gate, up)} of a legacy rank file, every tensor mapped from the file."""
    _, refs = read_refs(path)
    sd: dict[str, Any] = {}
    for key, ref in refs.items():
        if key.endswith("mlp.linear_fc1.weight"):
            half = ref.shape[0] // 2
            sd[key] = (_mapped(ref, 0, half), _mapped(ref, half, half))
        else:
            sd[key] = _mapped(ref)
    return sd


def legacy_to_dist(legacy_root: Path, out: Path, meta: mio.CheckpointMeta, common: dict[str, Any]) -> None:
    """The release rank files under `legacy_root` (even shards at meta's tp, pp) -> torch_dist in `out`."""
    sharded: dict[str, Any] = {}
    for pp_rank in range(meta.pp):
        for tp_rank in range(meta.tp):
            sd = mapped_rank(mio.rank_path(legacy_root, "release", tp_rank, pp_rank, meta.pp), meta)
            part = dist_ckpt.sharded_state_dict(sd, meta.shape, meta.tp, meta.pp, tp_rank, pp_rank)
            sharded.update({f"r{tp_rank}.{pp_rank}/{k}": v for k, v in part.items()})
    dist_ckpt.save(out, sharded, common)


def dist_common(args, iteration: int = 0, **extra: Any) -> dict[str, Any]:
    """The common state Megatron-LM saves beside the sharded tensors (its generate_state_dict)."""
    return {"args": args, "checkpoint_version": mio.CHECKPOINT_VERSION, "iteration": iteration,
            "num_floating_point_operations_so_far": 0, **extra}


class _NoBar:
    def set_postfix_str(self, *_: Any) -> None: ...
    def update(self, *_: Any) -> None: ...


def as_legacy(ck: mio.OpenCheckpoint, staging: Path) -> mio.OpenCheckpoint:
    """A torch_dist checkpoint written out as release rank files at its own (tp, pp) into `staging`, for a reader
    built on memory-mapped rank files (bounded memory; one more write of the bytes)."""
    if ck.format == "torch":
        return ck
    args = mio.megatron_args(ck.meta, seq_length=getattr(mio.read_args(ck), "seq_length", None))
    write_legacy_from_dist(ck, staging, ck.meta, args, _NoBar())
    mio.write_meta(staging, ck.meta)
    mio.write_tracker(staging, "release")
    return mio.open_checkpoint(staging)


def finish_dist(tmp: Path, meta: mio.CheckpointMeta, args) -> None:
    """The staged rank files of a single-process writer (tmp/STAGING) -> torch_dist tmp/release/."""
    import shutil

    legacy_to_dist(tmp / STAGING, tmp / mio.iteration_dir_name("release"), meta, dist_common(args))
    shutil.rmtree(tmp / STAGING)


def save_dist_shard(tmp: Path, meta: mio.CheckpointMeta, sd: dict, tp_rank: int, pp_rank: int, args) -> None:
    """This rank's part of a torch_dist release checkpoint written by every rank of a job together (tmp/release/):
    a collective (call it on every rank, after every check that could fail on one of them)."""
    from megatron_prune.checkpoint.keys import to_local_names

    sharded = dist_ckpt.sharded_state_dict(to_local_names(sd), meta.shape, meta.tp, meta.pp, tp_rank, pp_rank)
    dist_ckpt.save(tmp / mio.iteration_dir_name("release"), sharded, dist_common(args))
