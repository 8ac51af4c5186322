"""File driver for resharding: validate every source file and plan every target rank first, then write one
target rank at a time. The tensor logic (which source rows/columns make each target tensor) is in
checkpoint.reshard.

Streaming: source rank files are opened with `map_location="meta"`, which yields each tensor's shape, dtype and
byte offset in its file without reading data. A target rank file is first written as a skeleton
(`torch.serialization.skip_data`: the zip records and pickle, with holes where the tensor bytes go), then filled
in place: row pieces (embedding, qkv, fc1, output; about three quarters of a LLaMA's bytes) are copied file to
file with copy_file_range, as `cp` does, and the column-split tensors (linear_proj, linear_fc2) are gathered
through two reusable buffers of ~1 MiB. Memory beyond the interpreter and torch stays at a few MiB, whatever the
shard size. With MEGATRON_PRUNE_CRC32=1 (zip CRC32s for old readers) each target rank is built in memory and
written with torch.save instead.

Output: a "release" checkpoint (iteration 0) with `rank_sizes` None. A training checkpoint is resharded for its
weights only: optimizer, scheduler, RNG state and the data position are dropped (the optimizer state is bucketed
per DP rank and parameter layout and cannot be re-split exactly); the history entry records the source iteration.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.atomic import atomic_dir, check_free_space, check_output_dir
from megatron_prune.checkpoint.consistency import NonFiniteError, describe_non_finite, is_finite
from megatron_prune.checkpoint.dist_files import STAGING, dist_common, legacy_to_dist, write_legacy_from_dist
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.checkpoint.byteio import (CHUNK, RankFileIO, TensorRef, as_bytes, copy_range, fill_rank_file,
                                              pread_into, pwrite_all, read_refs, read_tensor, save_rank_skeleton)
from megatron_prune.checkpoint.keys import stage_extra_state_keys, stage_tensor_maps, to_te_names
from megatron_prune.checkpoint.reshard import PAD, TensorPlan, assemble, plan_rank
from megatron_prune.config.shape import DTYPE_BYTES, ShapeError
from megatron_prune.errors import InputError

ROOT_SKIP = {mio.TRACKER, mio.META}
ARG_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "padded_vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size")
BLOCK = 1 << 20  # bytes of rows per gather block (linear_proj, linear_fc2)


class SourceCheckpoint:
    """A source checkpoint, validated on construction: every rank file present and readable, one iteration, the
    same model args everywhere, exactly the tensors its shape and layout call for."""

    def __init__(self, ck: mio.OpenCheckpoint):
        self.root, self.meta, self.iteration = ck.root, ck.meta, ck.iteration
        self.refs: dict[tuple[int, int], dict[str, TensorRef]] = {}
        self.args = None
        ref_args = None
        for pp_rank in range(self.meta.pp):
            for tp_rank in range(self.meta.tp):
                path = mio.rank_path(self.root, self.iteration, tp_rank, pp_rank, self.meta.pp)
                state, refs = read_refs(path)
                self._check_state(path, state)
                sig = _args_signature(state.get("args"))
                if ref_args is None:
                    ref_args, self.args = (sig, path), state.get("args")
                elif sig != ref_args[0]:
                    raise CheckpointError(f"{path}: model args {sig} differ from {ref_args[1]}'s {ref_args[0]} "
                                          f"(fields {', '.join(ARG_FIELDS)})")
                self._check_keys(path, pp_rank, refs)
                self.refs[(pp_rank, tp_rank)] = refs

    def _check_state(self, path: Path, state: dict) -> None:
        want = 0 if self.iteration == "release" else self.iteration
        if state.get("iteration", want) != want:
            raise CheckpointError(f"{path}: iteration {state.get('iteration')} differs from the tracker's "
                                  f"{self.iteration}")
        args = state.get("args")
        sizes = (getattr(args, "tensor_model_parallel_size", None), getattr(args, "pipeline_model_parallel_size", None))
        if args is not None and sizes != (self.meta.tp, self.meta.pp):
            raise CheckpointError(f"{path}: written for tp={sizes[0]}, pp={sizes[1]}, but the checkpoint is "
                                  f"tp={self.meta.tp}, pp={self.meta.pp}")

    def _check_keys(self, path: Path, pp_rank: int, refs: dict[str, TensorRef]) -> None:
        s = self.meta.shape
        want = {k for k, _, _ in stage_tensor_maps(s.num_layers, self.meta.pp, pp_rank, s.tie_word_embeddings)}
        missing, extra = sorted(want - refs.keys()), sorted(refs.keys() - want)
        if missing:
            raise CheckpointError(f"{path}: {len(missing)} tensors missing, e.g. {missing[:3]} (layers="
                                  f"{s.num_layers}, pp={self.meta.pp}, stage {pp_rank})")
        if extra:
            raise CheckpointError(f"{path}: unexpected tensors, e.g. {extra[:3]} (layers={s.num_layers}, "
                                  f"pp={self.meta.pp}, stage {pp_rank})")

    def shapes(self) -> dict[int, list[dict[str, tuple[int, ...]]]]:
        return {p: [{k: r.shape for k, r in self.refs[(p, t)].items()} for t in range(self.meta.tp)]
                for p in range(self.meta.pp)}

    def ref(self, plan: TensorPlan, tp_rank: int) -> TensorRef:
        return self.refs[(plan.src_stage, tp_rank)][plan.src_key]


def _args_signature(args) -> tuple | None:
    return None if args is None else tuple(getattr(args, k, None) for k in ARG_FIELDS)


# ----------------------------------------------------------------------------- planning (before any write)
def target_meta(meta: mio.CheckpointMeta, tp: int, pp: int, source: Path, iteration) -> mio.CheckpointMeta:
    shape = meta.shape
    padded = shape.padded_vocab(meta.make_vocab_size_divisible_by, tp)
    try:
        shape.check_parallel(tp, pp, padded)
    except ShapeError as e:
        raise ShapeError(f"cannot reshard to tp={tp}, pp={pp}: {e}") from None
    out = meta.replace(tp=tp, pp=pp, padded_vocab_size=padded, rank_sizes=None)
    return out.with_history("reshard", source=str(source.resolve()), source_tp=meta.tp, source_pp=meta.pp,
                            tp=tp, pp=pp, source_iteration=iteration, uneven_source=meta.rank_sizes is not None)


def plan_all(src: SourceCheckpoint, dst: mio.CheckpointMeta) -> dict[tuple[int, int], list[TensorPlan]]:
    """Plans of every target rank; any inconsistency between the shards and the checkpoint's shape raises here."""
    shapes, plans = src.shapes(), {}
    for pp_rank in range(dst.pp):
        for tp_rank in range(dst.tp):
            try:
                rank = plan_rank(shapes, src.meta.shape, src.meta.pp, dst.tp, dst.pp, tp_rank, pp_rank,
                                 dst.padded_vocab_size)
            except InputError as e:
                raise CheckpointError(f"{src.root}: {e}") from None
            for plan in rank:
                dtypes = {src.ref(plan, r).dtype for r in range(src.meta.tp)}
                if len(dtypes) > 1:
                    raise CheckpointError(f"{src.root}: {plan.src_key} has different dtypes across TP ranks "
                                          f"{sorted(map(str, dtypes))} (stage {plan.src_stage})")
            plans[(tp_rank, pp_rank)] = rank
    return plans


def plan_bytes(plans: list[TensorPlan], src: SourceCheckpoint) -> int:
    return sum(math.prod(p.shape) * src.ref(p, 0).dtype.itemsize for p in plans)


# ----------------------------------------------------------------------------- byte moving
def _fill_rows(fd: int, offset: int, plan: TensorPlan, src: SourceCheckpoint, io: RankFileIO) -> None:
    """Row pieces are contiguous byte ranges of the source files: copied file to file."""
    row = math.prod(plan.shape[1:]) * src.ref(plan, 0).dtype.itemsize
    for p in plan.pieces:
        n = (p.stop - p.start) * row
        if p.src == PAD:
            for start in range(0, n, CHUNK):
                pwrite_all(fd, bytes(min(CHUNK, n - start)), offset + start)
        else:
            ref = src.ref(plan, p.src)
            copy_range(io.fd(ref.path), fd, n, ref.offset + p.start * row, offset, ref.path)
        offset += n


def _fill_columns(fd: int, offset: int, plan: TensorPlan, src: SourceCheckpoint, io: RankFileIO) -> None:
    """Column pieces (linear_proj, linear_fc2) are gathered a block of rows at a time: small enough (BLOCK) that
    the read and the write buffers stay in the CPU cache, which makes the two copies cost about one."""
    dtype = src.ref(plan, 0).dtype
    rows, cols = plan.shape
    pieces = [(src.ref(plan, p.src), p) for p in plan.pieces]
    widest = max([cols] + [ref.shape[1] for ref, _ in pieces])
    step = max(1, BLOCK // (widest * dtype.itemsize))
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        out, col = io.buffer("out", (n, cols), dtype), 0
        for ref, p in pieces:
            part = io.buffer("src", (n, ref.shape[1]), dtype)
            pread_into(io.fd(ref.path), [as_bytes(part)], ref.offset + r0 * ref.shape[1] * dtype.itemsize,
                        ref.path)
            out[:, col:col + p.stop - p.start].copy_(part[:, p.start:p.stop])
            col += p.stop - p.start
        pwrite_all(fd, as_bytes(out), offset + r0 * cols * dtype.itemsize)


def _fill(fd: int, offset: int, plan: TensorPlan, src: SourceCheckpoint, io: RankFileIO) -> None:
    """Write one target tensor's bytes at `offset` of an open output file."""
    if plan.kind == "replicated":
        shards = {r: read_tensor(src.ref(plan, r), io) for r in plan.sources()}
        try:
            full = assemble(plan, shards, src.ref(plan, 0).dtype)
        except InputError as e:
            raise CheckpointError(f"{src.root}: {plan.src_key} (stage {plan.src_stage}): {e}") from None
        pwrite_all(fd, as_bytes(full), offset)
    elif plan.dim == 0:
        _fill_rows(fd, offset, plan, src, io)
    else:
        _fill_columns(fd, offset, plan, src, io)


# ----------------------------------------------------------------------------- one target rank file
def _names(plans: list[TensorPlan], extra: list[str], te_names: bool) -> dict[str, str | None]:
    """Output key -> plan key (None for `_extra_state` entries), in the converter's order and spelling."""
    local = {p.key: p.key for p in plans} | {k: None for k in extra}
    return to_te_names(local) if te_names else local


def _streaming() -> bool:
    return not mio.crc32_wanted() and hasattr(torch.serialization, "skip_data")


def write_rank_streamed(out: Path, tp_rank: int, pp_rank: int, plans: list[TensorPlan], src: SourceCheckpoint,
                        dst: mio.CheckpointMeta, args, io: RankFileIO, bar) -> Path:
    """Skeleton first (zip records and pickle; holes for the bytes), then each tensor's bytes in place."""
    by_key = {p.key: p for p in plans}
    names = _names(plans, stage_extra_state_keys(dst.shape.num_layers, dst.pp, pp_rank), dst.te_names)
    specs = {name: None if key is None else (by_key[key].shape, src.ref(by_key[key], 0).dtype)
             for name, key in names.items()}
    path, written = save_rank_skeleton(out, tp_rank, pp_rank, dst.pp, specs, args)
    with fill_rank_file(path) as fd:
        for plan in plans:
            _fill(fd, written[plan.key].offset, plan, src, io)
            bar.update(written[plan.key].nbytes)
    return path


def write_rank_in_memory(out: Path, tp_rank: int, pp_rank: int, plans: list[TensorPlan], src: SourceCheckpoint,
                         dst: mio.CheckpointMeta, args, io: RankFileIO, bar) -> Path:
    """The whole target shard in memory, then torch.save (CRC32s on request)."""
    by_key = {p.key: p for p in plans}
    names = _names(plans, stage_extra_state_keys(dst.shape.num_layers, dst.pp, pp_rank), dst.te_names)
    model = {}
    for name, key in names.items():
        if key is None:
            model[name] = None
            continue
        plan = by_key[key]
        shards = {r: read_tensor(src.ref(plan, r), io) for r in plan.sources()}
        model[name] = assemble(plan, shards, src.ref(plan, 0).dtype)
        bar.update(model[name].numel() * model[name].element_size())
    return mio.save_rank(out, "release", tp_rank, pp_rank, dst.pp, mio.rank_state(model, args, 0))


# ----------------------------------------------------------------------------- entry point
def reshard(load: str | Path, save: str | Path, tp: int, pp: int = 1, overwrite: bool = False,
            progress: bool = True, check_finite: bool = False, ckpt_format: str = "torch") -> mio.CheckpointMeta:
    """Change the TP/PP size (and/or the format: `ckpt_format` "torch" or "torch_dist") of a Megatron checkpoint,
    legacy (even or uneven shards) or torch_dist, one output rank at a time. Everything is validated and planned
    before the first byte is written; the output appears atomically. With check_finite each written rank is checked
    for NaN / Inf while its bytes are still in the page cache."""
    if ckpt_format not in mio.FORMATS:
        raise InputError(f"--ckpt-format {ckpt_format!r} is not one of {', '.join(mio.FORMATS)}")
    check_output_dir(save, overwrite, inputs={"--load": load})
    ck = mio.open_checkpoint(load)
    dst = target_meta(ck.meta, tp, pp, ck.root, ck.iteration)
    if ck.format == "torch":
        src = SourceCheckpoint(ck)
        plans, seq = plan_all(src, dst), getattr(src.args, "seq_length", None)
        total = sum(plan_bytes(p, src) for p in plans.values())
    else:
        src, plans, seq = None, None, getattr(mio.read_args(ck), "seq_length", None)
        total = dst.shape.num_params() * DTYPE_BYTES[dst.shape.dtype]
    args = mio.megatron_args(dst, seq_length=seq, ckpt_format=ckpt_format)
    check_free_space(Path(save).parent, total * (2 if ckpt_format == "torch_dist" else 1), save)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # copies of ~1 MiB blocks: waking a thread pool costs more than it saves (measured)
    try:
        with atomic_dir(save, overwrite) as tmp, \
                tqdm(total=total, desc="reshard", unit="B", unit_scale=True, disable=not progress) as bar:
            legacy = tmp if ckpt_format == "torch" else tmp / STAGING
            if src is not None:
                _write_from_legacy(legacy, plans, src, dst, args, bar, check_finite)
            else:
                for path in write_legacy_from_dist(ck, legacy, dst, args, bar):
                    if check_finite:
                        check_finite_file(path, ck.root)
            if ckpt_format == "torch_dist":
                legacy_to_dist(legacy, tmp / mio.iteration_dir_name("release"), dst, dist_common(args))
                shutil.rmtree(legacy)
            _copy_root_files(ck.root, tmp)
            mio.write_meta(tmp, dst)
            mio.write_tracker(tmp, "release")
    finally:
        torch.set_num_threads(threads)
    return dst


def _write_from_legacy(out: Path, plans, src: SourceCheckpoint, dst: mio.CheckpointMeta, args, bar,
                       check_finite: bool) -> None:
    write = write_rank_streamed if _streaming() else write_rank_in_memory
    with RankFileIO() as io:
        for (tp_rank, pp_rank), rank_plans in plans.items():
            bar.set_postfix_str(f"rank tp{tp_rank}" + (f" pp{pp_rank}" if dst.pp > 1 else ""))
            path = write(out, tp_rank, pp_rank, rank_plans, src, dst, args, io, bar)
            if check_finite:
                check_finite_written(path, rank_plans, src, io)


CHECK_CHUNK = 4 << 20  # bytes per read-back block of the finite check


def check_finite_written(path: Path, plans: list[TensorPlan], src: SourceCheckpoint, io: RankFileIO) -> None:
    """Row pieces are copied file to file without passing through this process, so the written rank is read
    back (its pages were just written: no disk read) a block at a time into a reusable buffer and summed; a
    non-finite tensor is traced to the source rank file holding it."""
    _, written = read_refs(path)
    by_key = {p.key: p for p in plans}
    fd = os.open(path, os.O_RDONLY)
    try:
        for key, ref in written.items():
            if not _finite_on_disk(fd, ref, io):
                _raise_non_finite_source(by_key[key], src, io, path)
    finally:
        os.close(fd)


def check_finite_file(path: Path, source: Path) -> None:
    """A rank file written from a torch_dist source: each tensor read back and summed (see check_finite_written)."""
    _, written = read_refs(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        with RankFileIO() as io:
            for key, ref in written.items():
                if not _finite_on_disk(fd, ref, io):
                    raise NonFiniteError(f"{source}: tensor {key!r} holds non-finite values (written to {path}); "
                                         f"reshard without --check-finite to copy it anyway")
    finally:
        os.close(fd)


def _finite_on_disk(fd: int, ref: TensorRef, io: RankFileIO) -> bool:
    if not ref.dtype.is_floating_point:
        return True
    step = max(1, CHECK_CHUNK // ref.dtype.itemsize)
    n = math.prod(ref.shape)
    for start in range(0, n, step):
        block = io.buffer("check", (min(step, n - start),), ref.dtype)
        pread_into(fd, [as_bytes(block)], ref.offset + start * ref.dtype.itemsize, ref.path)
        if not is_finite(block):
            return False
    return True


def _raise_non_finite_source(plan: TensorPlan, src: SourceCheckpoint, io: RankFileIO, written: Path) -> None:
    for r in plan.sources():
        ref = src.ref(plan, r)
        source = read_tensor(ref, io)
        if not is_finite(source):
            raise NonFiniteError(f"{ref.path}: tensor {plan.src_key!r} holds non-finite values "
                                 f"({describe_non_finite(source)}); reshard without --check-finite to copy it anyway")
    raise NonFiniteError(f"{written}: tensor {plan.key!r} holds non-finite values after resharding")


def _copy_root_files(src: Path, dst: Path) -> None:
    """Tokenizer files, prune plans and the like travel with the checkpoint."""
    for f in src.iterdir():
        if f.is_file() and f.name not in ROOT_SKIP:
            shutil.copy2(f, dst / f.name)
