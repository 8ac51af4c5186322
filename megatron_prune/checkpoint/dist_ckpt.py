"""Megatron's `torch_dist` checkpoint format: megatron-core's dist_checkpointing over torch.distributed.checkpoint.
Files are read and written only by megatron-core (its torch_dist strategy) and torch DCP; this module says what to
ask them for, and checks what they would otherwise trust.

    ITER_DIR/metadata.json   {"sharded_backend": "torch_dist", "sharded_backend_version": 1} (written last)
    ITER_DIR/.metadata       torch DCP's index: each tensor's global shape, dtype and chunks; where each chunk is
    ITER_DIR/__R_T.distcp    the chunks, one file per writing rank R and writer thread T
    ITER_DIR/common.pt       args, iteration, ... (megatron-core <= 0.16; newer versions keep this dict as the
                             `common_state` item inside the .distcp files)

A global tensor does not depend on the tensor- or pipeline-parallel sizes that wrote it: it is the TP=1 tensor of
megatron-core's layout, with the layers stacked along a leading axis (checkpoint.keys: `dist` names;
checkpoint.layout.shard_blocks: which rows or columns a TP rank holds). So any rank of any TP/PP reads its shard
directly, and one process reads one layer at a time (`StageReader`).

Trust: nothing here unpickles with plain pickle before it has been checked. `.metadata` (which torch DCP reads with
plain pickle) is first read with checkpoint.safe_pickle allowing only torch DCP's own metadata classes; the common
state is read with safe_pickle (args of any Megatron-LM version); megatron-core's object items (`_extra_state`,
`rng_state`: torch.load with weights_only=False inside torch DCP) are never requested. Every chunk file `.metadata`
names must exist and hold the bytes it places there.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from megatron_prune.checkpoint import safe_pickle
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.checkpoint.keys import EMBEDDING, OUTPUT, dist_name, stage_layers, stage_tensor_maps
from megatron_prune.checkpoint.layout import shard_blocks, split_dim

FORMAT = "torch_dist"
CONFIG_FILE = "metadata.json"
INDEX_FILE = ".metadata"
COMMON_FILE = "common.pt"
COMMON_ITEM = "common_state/shard_0_1"

# torch DCP's metadata classes: the only globals a `.metadata` file may name (it is unpickled with plain pickle by
# torch DCP, so anything else is refused before torch sees it).
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"),
    "torch.distributed.checkpoint.planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                             "BytesIOWriteData"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo", "_StoragePrefix"),
}


def _dcp_globals() -> dict[str, Any]:
    import importlib

    out = {}
    for module, names in _DCP_CLASSES.items():
        mod = importlib.import_module(module)
        out.update({f"{module}.{n}": getattr(mod, n) for n in names if hasattr(mod, n)})
    return out


# ----------------------------------------------------------------------------- what a directory holds
def is_dist_dir(path: Path) -> bool:
    """An iteration directory written in torch_dist (or another dist_checkpointing backend)."""
    return (path / CONFIG_FILE).is_file() or (path / INDEX_FILE).is_file()


def check_config(path: Path) -> None:
    """metadata.json names the torch_dist backend (megatron-core writes it last: a missing one is a partial save)."""
    config = path / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{config}: missing (megatron-core writes it last: an interrupted torch_dist save?)")
    try:
        backend = json.loads(config.read_text()).get("sharded_backend")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{config}: invalid ({type(e).__name__})") from None
    if backend != FORMAT:
        raise CheckpointError(f"{config}: sharded_backend {backend!r}, not {FORMAT!r} (only megatron-core's "
                              f"torch_dist format is read)")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class DistIndex:
    """What `.metadata` says the checkpoint holds, checked against the chunk files."""

    path: Path                          # the iteration directory
    tensors: dict[str, TensorInfo]
    objects: frozenset[str]             # byte items (megatron-core ShardedObjects)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors


def read_index(path: Path) -> DistIndex:
    """Parse `.metadata` (only torch DCP's classes allowed) and check every chunk file it names: present and long
    enough for every byte range it places there."""
    index = path / INDEX_FILE
    check_config(path)
    if not index.is_file():
        raise CheckpointError(f"{index}: missing (not a complete torch_dist checkpoint)")
    try:
        md = safe_pickle.loads(index.read_bytes(), strict=_dcp_globals())
        tensors, objects = {}, set()
        for key, item in md.state_dict_metadata.items():
            if hasattr(item, "size"):
                tensors[key] = TensorInfo(tuple(item.size), item.properties.dtype)
            else:
                objects.add(key)
        needed: dict[str, int] = {}
        for info in md.storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except CheckpointError as e:
        raise CheckpointError(f"{index}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any malformed index is the file's fault
        raise CheckpointError(f"{index}: not a torch DCP index ({type(e).__name__}: {e})") from None
    for name, end in sorted(needed.items()):
        chunk = path / name
        if Path(name).name != name or not chunk.is_file():
            raise CheckpointError(f"{chunk}: missing ({index.name} places checkpoint data there)")
        size = chunk.stat().st_size
        if size < end:
            raise CheckpointError(f"{chunk}: truncated ({size} bytes; {index.name} places data up to byte {end})")
    return DistIndex(path, tensors, frozenset(objects))


def read_common(index: DistIndex) -> dict[str, Any]:
    """The common state (args, iteration, checkpoint_version, ...): common.pt, or the `common_state` item."""
    path = index.path / COMMON_FILE
    try:
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle)
        elif COMMON_ITEM in index.objects:
            path = index.path / INDEX_FILE
            state = torch.load(io.BytesIO(_read_item(index.path, COMMON_ITEM)), map_location="cpu",
                               weights_only=False, pickle_module=safe_pickle)[0]
        else:
            raise CheckpointError(f"{index.path}: no {COMMON_FILE} and no common_state item: no args to read")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - the file's fault, one line
        raise CheckpointError(f"{path}: cannot read the common state ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the common state is not a dict")
    return state


def _read_item(path: Path, key: str) -> bytes:
    """The raw bytes of one object item, read by torch DCP (no_dist) without unpickling them."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    class RawBytes(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            self.original_state_dict[read_item.dest_index.fqn] = value.getvalue()

    state = {key: io.BytesIO()}
    planner = RawBytes(flatten_state_dict=False, flatten_sharded_tensors=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch DCP's notices about loading without a process group
        dcp_load(state, storage_reader=FileSystemReader(str(path)), planner=planner, no_dist=True)
    return state[key]


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ----------------------------------------------------------------------------- process group and CPU stand-ins
_MEGATRON_NOTICES = r".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*"


def _import_megatron() -> None:
    """megatron-core's dist_checkpointing, imported once without its notices that TE / apex are absent (they are
    optional accelerators here; a command that only reads a checkpoint should not print them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_MEGATRON_NOTICES)
        import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401


@contextlib.contextmanager
def megatron_io_context() -> Iterator[None]:
    """What megatron-core's dist_checkpointing needs around a call: a process group (a private one of one process
    when none exists), and on a machine without CUDA, `torch.cuda.synchronize` / `current_device` stand-ins
    (no tensor value depends on them). Both are undone on exit."""
    _import_megatron()
    own_group = not dist.is_initialized()
    if own_group:
        hook = sys.excepthook  # init_process_group wraps it (a "[rank0]:" prefix per call): keep ours
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        sys.excepthook = hook
    patched = []
    if not torch.cuda.is_available():
        for name, stand_in in (("synchronize", lambda *a, **k: None), ("current_device", lambda: "cpu")):
            patched.append((name, getattr(torch.cuda, name)))
            setattr(torch.cuda, name, stand_in)
    try:
        yield
    finally:
        for name, original in patched:
            setattr(torch.cuda, name, original)
        if own_group:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- reading shards
@dataclass(frozen=True)
class Piece:
    """Part of a local tensor: rows (dim 0) or columns (dim 1) [start, stop) of global tensor `key` (at `layer` of
    the stacked axis, or None), placed at [at, at + stop - start) of the local tensor along the same dim."""

    key: str
    layer: int | None
    dim: int
    start: int
    stop: int
    at: int


def shard_pieces(local_key: str, kind: str, layer: int | None, global_shape: tuple[int, ...], tp: int,
                 tp_rank: int, local_rows: int | None = None) -> tuple[tuple[int, ...], list[Piece]]:
    """(local shape, pieces) of TP rank `tp_rank`'s shard of one tensor. `local_rows`: for the vocab tables, the
    rows a rank holds at this TP (the padded vocab / tp); rows past the stored table are zero padding."""
    key = dist_name(local_key)
    dims = global_shape[1:] if layer is not None else global_shape
    if kind == "vocab":
        start = tp_rank * local_rows
        stop = min(start + local_rows, dims[0])
        pieces = [Piece(key, layer, 0, start, stop, 0)] if stop > start else []
        return (local_rows, *dims[1:]), pieces
    dim, blocks = shard_blocks(kind, dims, tp, tp_rank)
    pieces, at = [], 0
    for block in blocks:
        if pieces and pieces[-1].stop == block.start:  # adjacent (fc1's gate and up at TP=1): one read, no copy
            last = pieces.pop()
            pieces.append(Piece(key, layer, dim, last.start, block.stop, last.at))
        else:
            pieces.append(Piece(key, layer, dim, block.start, block.stop, at))
        at += len(block)
    local = list(dims)
    local[dim] = at
    return tuple(local), pieces


def _request(piece: Piece, info: TensorInfo):
    """A megatron-core ShardedTensor that asks for exactly the piece."""
    _import_megatron()
    from megatron.core.dist_checkpointing import ShardedTensor

    shape, offset = list(info.shape), [0] * len(info.shape)
    lead = 0 if piece.layer is None else 1
    if piece.layer is not None:
        shape[0], offset[0] = 1, piece.layer
    shape[lead + piece.dim], offset[lead + piece.dim] = piece.stop - piece.start, piece.start
    return ShardedTensor(piece.key, None, info.dtype, tuple(shape), info.shape, tuple(offset), None, 0, 0)


def load_pieces(index: DistIndex, wanted: Mapping[str, tuple[tuple[int, ...], list[Piece]]]
                ) -> dict[str, torch.Tensor]:
    """{local key: tensor} assembled from the pieces (one megatron-core load for all of them; under a multi-rank
    process group with megatron-core <= 0.16 this is a collective: every rank calls it once)."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    requests: dict[str, Any] = {}
    for name, (_, pieces) in wanted.items():
        for i, piece in enumerate(pieces):
            if piece.key not in index:
                raise CheckpointError(f"{index.path / INDEX_FILE}: no tensor {piece.key!r} (needed for {name})")
            requests[f"{name}#{i}"] = _request(piece, index.tensors[piece.key])
    try:
        with megatron_io_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch DCP's deprecation of the call megatron-core makes
            loaded = TorchDistLoadShardedStrategy().load(requests, index.path) if requests else {}
    except Exception as e:  # noqa: BLE001 - torch DCP reports unreadable chunks in many shapes
        raise CheckpointError(f"{index.path}: cannot read the torch_dist checkpoint ({type(e).__name__}: "
                              f"{_first_line(e)})") from None
    out = {}
    for name, (shape, pieces) in wanted.items():
        dtype = index.tensors[pieces[0].key].dtype if pieces else _vocab_dtype(index)
        t = torch.zeros(shape, dtype=dtype) if not pieces or _partial(shape, pieces) else None
        for i, piece in enumerate(pieces):
            part = loaded[f"{name}#{i}"]
            part = part[0] if piece.layer is not None else part
            if t is None and len(pieces) == 1:
                t = part
                continue
            t.narrow(piece.dim, piece.at, piece.stop - piece.start).copy_(part)
        out[name] = t
    return out


def _partial(shape: tuple[int, ...], pieces: list[Piece]) -> bool:
    return len(pieces) != 1 or pieces[0].stop - pieces[0].start != shape[pieces[0].dim]


def _vocab_dtype(index: DistIndex) -> torch.dtype:
    key = dist_name(EMBEDDING.mcore) if dist_name(EMBEDDING.mcore) in index else dist_name(OUTPUT.mcore)
    return index.tensors[key].dtype


def rank_pieces(index: DistIndex, shape, tp: int, pp: int, tp_rank: int, pp_rank: int, padded_vocab: int
                ) -> dict[str, tuple[tuple[int, ...], list[Piece]]]:
    """{local-spec key: (shape, pieces)} of every tensor of rank (tp_rank, pp_rank) at (tp, pp)."""
    layers = stage_layers(shape.num_layers, pp, pp_rank)
    out = {}
    for mkey, _, kind in stage_tensor_maps(shape.num_layers, pp, pp_rank, shape.tie_word_embeddings):
        layer = _layer_of(mkey, layers)
        source = EMBEDDING.mcore if mkey == OUTPUT.mcore and shape.tie_word_embeddings else mkey
        info = index.tensors.get(dist_name(source))
        if info is None:
            raise CheckpointError(f"{index.path / INDEX_FILE}: no tensor {dist_name(source)!r} (needed for {mkey})")
        out[mkey] = shard_pieces(source, kind, layer, info.shape, tp, tp_rank, padded_vocab // tp)
    return out


def _layer_of(mkey: str, layers: range) -> int | None:
    parts = mkey.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        return layers[int(parts[2])]
    return None


class StageReader(Mapping):
    """The local-spec state dict of one rank, read lazily one layer at a time (the last layer read is kept): what
    the exporter and the resharder iterate over, without the whole model in memory."""

    def __init__(self, index: DistIndex, pieces: dict[str, tuple[tuple[int, ...], list[Piece]]]):
        self._index, self._pieces = index, pieces
        self._group: str | None = None
        self._cache: dict[str, torch.Tensor] = {}

    @staticmethod
    def _group_of(key: str) -> str:
        parts = key.split(".")
        return ".".join(parts[:3]) if parts[:2] == ["decoder", "layers"] else key

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._pieces:
            raise KeyError(key)
        group = self._group_of(key)
        if group != self._group:
            self._cache = {}  # free the previous layer before reading the next
            members = {k: v for k, v in self._pieces.items() if self._group_of(k) == group}
            self._cache, self._group = load_pieces(self._index, members), group
        return self._cache[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._pieces[key][0]

    def dtype(self, key: str) -> torch.dtype:
        pieces = self._pieces[key][1]
        return self._index.tensors[pieces[0].key].dtype if pieces else _vocab_dtype(self._index)

    def __iter__(self):
        return iter(self._pieces)

    def __len__(self) -> int:
        return len(self._pieces)


# ----------------------------------------------------------------------------- writing
def sharded_state_dict(sd: Mapping[str, torch.Tensor | None], shape, tp: int, pp: int, tp_rank: int, pp_rank: int,
                       dp_rank: int = 0) -> dict[str, Any]:
    """megatron-core's sharded state dict of one rank's local-spec state dict `sd` (what GPTModel.sharded_state_dict
    makes: the same keys, layer offsets, TP fragments, swiglu halves and `_extra_state` objects). Replicated tensors
    (norms) are saved by TP rank 0, every tensor by DP rank 0."""
    _import_megatron()
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    layers = stage_layers(shape.num_layers, pp, pp_rank)
    out: dict[str, Any] = {}
    for mkey, _, kind in stage_tensor_maps(shape.num_layers, pp, pp_rank, shape.tie_word_embeddings):
        if mkey == OUTPUT.mcore and shape.tie_word_embeddings:
            continue  # a tied output layer is the embedding: stored once, under its name
        t, layer = sd[mkey], _layer_of(mkey, layers)
        lead = () if layer is None else ((0, layer, shape.num_layers),)
        n = len(lead)
        replica = (0, 0, dp_rank)
        if kind == "replicated":
            parts = [(mkey, t, lead, (0, tp_rank, dp_rank))]
        elif kind == "fc1":  # (gate, up) may come pre-split (mapped separately: see dist_files)
            gate, up = t if isinstance(t, tuple) else torch.chunk(t, 2, dim=0)
            parts = [(mkey + "#gate", gate, lead + ((n, tp_rank, 2 * tp),), replica),
                     (mkey + "#up", up, lead + ((n, tp + tp_rank, 2 * tp),), replica)]
        else:
            parts = [(mkey, t, lead + ((n + split_dim(kind), tp_rank, tp),), replica)]
        for name, data, offsets, rid in parts:
            out[name] = ShardedTensor.from_rank_offsets(dist_name(mkey), data, *offsets, replica_id=rid,
                                                        prepend_axis_num=n)
    for local, layer in enumerate(layers):
        for linear in _EXTRA_STATE_LINEARS:
            key = f"decoder.layers.{linear}._extra_state"
            out[f"decoder.layers.{local}.{linear}._extra_state"] = ShardedObject(
                key, None, (shape.num_layers,), (layer,), replica_id=(0, tp_rank, dp_rank))
    return out


_EXTRA_STATE_LINEARS = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
                        "mlp.linear_fc2")


def save(path: Path, sharded: dict[str, Any], common: dict[str, Any],
         content_metadata: dict[str, Any] | None = None) -> None:
    """megatron-core's dist_checkpointing.save of `sharded` plus the common state into the (empty) directory `path`
    (every rank of the process group calls it, each with its own shards)."""
    _import_megatron()
    from megatron.core import dist_checkpointing

    path.mkdir(parents=True, exist_ok=True)
    with megatron_io_context():
        _fork_results_queue()
        dist_checkpointing.save({**common, **sharded}, str(path), content_metadata=content_metadata)


def load_state(index: DistIndex, request: dict[str, Any]) -> dict[str, Any]:
    """megatron-core's dist_checkpointing.load semantics (the common state with the requested sharded tensors merged
    in, factories applied) with the common state read by safe_pickle and no object item requested (torch DCP
    unpickles those with plain pickle); a collective under a multi-rank process group with megatron-core <= 0.16."""
    _import_megatron()
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values, merge
    from megatron.core.dist_checkpointing.mapping import ShardedObject, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    state = read_common(index)
    sharded, nonpersistent, factories = load_preprocess(request)
    merge(state, nonpersistent)
    sharded, _ = extract_sharded_base(sharded)
    _, sharded = extract_matching_values(sharded, lambda v: isinstance(v, ShardedObject))
    try:
        with megatron_io_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            loaded = TorchDistLoadShardedStrategy().load(sharded, index.path)
    except Exception as e:  # noqa: BLE001 - torch DCP reports unreadable or missing entries in many shapes
        raise CheckpointError(f"{index.path}: cannot read the torch_dist checkpoint ({type(e).__name__}: "
                              f"{_first_line(e)})") from None
    merge(state, loaded)
    return apply_factory_merges(state, factories)


def read_object(index: DistIndex, unique_key: str) -> Any:
    """One object item (a megatron-core ShardedObject, e.g. `rng_state/shard_0.1_1.2`) read by safe_pickle; None
    when the checkpoint has none of that name."""
    if unique_key not in index.objects:
        return None
    try:
        return torch.load(io.BytesIO(_read_item(index.path, unique_key)), map_location="cpu", weights_only=False,
                          pickle_module=safe_pickle)[0]
    except Exception as e:  # noqa: BLE001 - the file's fault, one line
        raise CheckpointError(f"{index.path}: cannot read {unique_key} ({type(e).__name__}: {_first_line(e)})") \
            from None


def _fork_results_queue() -> None:
    """megatron-core's writer collects results through a queue it makes with a *spawn* Manager on first use: a
    process that re-imports `__main__` (a script without a main guard then hangs) and costs seconds. Its writer
    processes are forked; a forked Manager serves the queue as well."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None and hasattr(filesystem_async, "_results_queue"):
        import multiprocessing

        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def chunk_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == ".distcp")


def fsync_dir_files(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
