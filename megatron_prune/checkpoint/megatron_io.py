"""Megatron checkpoints on disk: Megatron-LM's legacy `torch` layout (rank files), its `torch_dist` layout
(checkpoint.dist_ckpt), and our `megatron_prune.json` beside either. `open_checkpoint` is the one way in: tracker,
meta, format, and every file checked against the meta before a tensor is read.

    ROOT/latest_checkpointed_iteration.txt         "release" (converted/pruned) or the iteration (training)
    ROOT/release/mp_rank_TT/model_optim_rng.pt      PP=1   (iter_XXXXXXX/ for training checkpoints)
    ROOT/release/mp_rank_TT_PPP/model_optim_rng.pt  PP>1
    ROOT/megatron_prune.json                        shape, parallel sizes, dtype, per-rank sizes, history
    ROOT/iter_XXXXXXX/megatron_prune.json           training: the meta of that iteration (its dtype, history)

The meta that describes a checkpoint is the one of the iteration its tracker names: the iteration directory's own
copy when it has one, else the root file. Training writes the iteration's copy before the tracker and the root
file after it (with an "iteration" field), so a crash between the two never pairs one iteration's tensors with
another iteration's meta (e.g. a bf16 dtype for fp32 `release/` weights, after in-place training).

Step-0 checkpoints (converted, pruned, resharded) are written as "release": older Megatron-LM's `read_metadata`
accepts iteration 0 only under that name. A tracker "0" (what current Megatron-LM writes for an iteration-0 save) is
read as iter_0000000/. Each rank file is {"model": state_dict, "args": Namespace, "checkpoint_version": 3.0,
"iteration": N}; `args` carries Megatron-LM's field names (see mlm_compat). The rank record
"megatron_prune_rank": {"tp_rank", "pp_rank", "tp", "pp"} says which folder the file belongs in (Megatron-LM ignores
keys it does not know); every rank file read is checked against its folder and the meta (checkpoint.consistency).
Rank files and args are unpickled with checkpoint.safe_pickle: no code runs, whatever Megatron-LM version wrote them.

A `torch_dist` iteration directory (metadata.json + .metadata + *.distcp) holds TP/PP-independent global tensors:
it is read at any (tp, pp) (`open_checkpoint(root, tp, pp)`), its meta from megatron_prune.json when we wrote it,
else from the args in its common state.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_prune.checkpoint import dist_ckpt, mlm_compat, safe_pickle
from megatron_prune.checkpoint.atomic import atomic_file, atomic_write_text
from megatron_prune.checkpoint.consistency import (RANK_RECORD, check_dist_shapes, check_rank_state,
                                                   rank_record)
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.checkpoint.meta import CheckpointMeta
from megatron_prune.config.shape import LlamaShape, RopeScaling, ShapeError

TRACKER = "latest_checkpointed_iteration.txt"
META = "megatron_prune.json"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
FORMATS = ("torch", "torch_dist")  # Megatron-LM's --ckpt-format values we read and write

torch.serialization.add_safe_globals([argparse.Namespace])  # for plain weights_only loads of our own rank files


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_path(root: Path, iteration: int | str, tp_rank: int, pp_rank: int, pp: int) -> Path:
    return Path(root) / iteration_dir_name(iteration) / rank_dir_name(tp_rank, pp_rank, pp) / RANK_FILE


def megatron_args(meta: CheckpointMeta, seq_length: int | None = None, **extra: Any) -> argparse.Namespace:
    """The args Megatron-LM reads with --use-checkpoint-args (and that we read back)."""
    s = meta.shape
    args = argparse.Namespace(
        num_layers=s.num_layers, hidden_size=s.hidden_size, ffn_hidden_size=s.ffn_hidden_size,
        num_attention_heads=s.num_attention_heads, group_query_attention=s.num_query_groups != s.num_attention_heads,
        num_query_groups=s.num_query_groups, kv_channels=s.kv_channels,
        seq_length=seq_length or min(s.max_position_embeddings, 4096),
        max_position_embeddings=s.max_position_embeddings, padded_vocab_size=meta.padded_vocab_size,
        vocab_size=s.vocab_size, make_vocab_size_divisible_by=meta.make_vocab_size_divisible_by,
        tensor_model_parallel_size=meta.tp, pipeline_model_parallel_size=meta.pp,
        virtual_pipeline_model_parallel_size=None, normalization="RMSNorm", norm_epsilon=s.norm_eps, swiglu=True,
        untie_embeddings_and_output_weights=not s.tie_word_embeddings, position_embedding_type="rope",
        use_rotary_position_embeddings=True, rotary_base=s.rope_theta, rotary_percent=1.0,
        rotary_interleaved=False, use_rope_scaling=s.rope_scaling is not None,
        rope_scaling_factor=s.rope_scaling.factor if s.rope_scaling else 8.0,
        add_bias_linear=False, add_qkv_bias=False, disable_bias_linear=True, hidden_dropout=0.0,
        attention_dropout=0.0, apply_query_key_layer_scaling=False, bf16=s.dtype == "bfloat16",
        fp16=s.dtype == "float16", params_dtype=getattr(torch, s.dtype),
        transformer_impl="transformer_engine" if meta.te_names else "local",
        consumed_train_samples=0, consumed_valid_samples=0, tokenizer_type="HuggingFaceTokenizer",
        **mlm_compat.megatron_lm_fields(s.norm_eps),
    )
    for k, v in extra.items():
        setattr(args, k, v)
    return args


def crc32_wanted() -> bool:
    """Zip CRC32s cost ~4x the write time of a rank file. torch >= 2.6 loads files without them; set
    MEGATRON_PRUNE_CRC32=1 when an older torch (or an unzip tool) must read the checkpoint."""
    return os.environ.get("MEGATRON_PRUNE_CRC32", "0") == "1" or not hasattr(torch.serialization, "set_crc32_options")


def save_rank(root: Path, iteration: int | str, tp_rank: int, pp_rank: int, pp: int, state: dict[str, Any]) -> Path:
    """Write one rank file atomically (temp sibling, fsync, rename), with its rank record (read back by
    load_rank)."""
    path = rank_path(root, iteration, tp_rank, pp_rank, pp)
    tp = getattr(state.get("args"), "tensor_model_parallel_size", None)
    state = {**state, RANK_RECORD: rank_record(tp_rank, pp_rank, tp, pp)}
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_file(path, lambda tmp: torch_save(state, tmp))


def torch_save(obj: Any, path: Path) -> None:
    """torch.save without zip CRC32s unless they are wanted (see crc32_wanted)."""
    if crc32_wanted():
        torch.save(obj, path)
        return
    from torch.utils.serialization import config

    previous = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        torch.save(obj, path)
    finally:
        config.save.compute_crc32 = previous


def rank_state(model_sd: dict[str, Any], args: argparse.Namespace, iteration: int) -> dict[str, Any]:
    return {"model": model_sd, "args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}


def write_meta(root: Path, meta: CheckpointMeta, iteration: int | str | None = None) -> None:
    """`iteration`: the iteration this meta describes, recorded in the file (training checkpoints)."""
    d = meta.to_json()
    if iteration is not None:
        d["iteration"] = "release" if iteration == "release" else int(iteration)
    atomic_write_text(Path(root) / META, json.dumps(d, indent=2, default=str) + "\n")


def iteration_meta_path(root: str | Path, iteration: int | str) -> Path:
    return Path(root) / iteration_dir_name(iteration) / META


def pin_meta(root: str | Path) -> None:
    """Before the root meta is rewritten for a new iteration: give the iteration it describes now (e.g. the
    `release/` of a converted checkpoint trained in place) its own copy, so that iteration stays readable."""
    root = Path(root)
    if not ((root / META).is_file() and (root / TRACKER).is_file()):
        return
    tracked = read_tracker(root)
    own = iteration_meta_path(root, tracked)
    if own.parent.is_dir() and not own.is_file():
        atomic_write_text(own, (root / META).read_text())


def write_tracker(root: Path, iteration: int | str) -> None:
    """Written last: a checkpoint is complete only once its tracker exists."""
    atomic_write_text(Path(root) / TRACKER, "release" if iteration == "release" else str(int(iteration)))


def not_a_checkpoint(root: str | Path) -> CheckpointError:
    """The error for a folder without a tracker: missing, or not (yet) a complete checkpoint."""
    why = f"no tracker file {TRACKER}" if Path(root).is_dir() else "no such directory"
    return CheckpointError(f"{root}: not a checkpoint ({why}); `convert hf-to-megatron` makes one from an HF model")


def read_tracker(root: str | Path) -> int | str:
    path = Path(root) / TRACKER
    if not path.is_file():
        raise not_a_checkpoint(root)
    text = path.read_text().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: invalid content {text!r} (expected 'release' or an iteration)") from None


def read_meta(root: str | Path) -> CheckpointMeta:
    """The meta of the tracked iteration (its own megatron_prune.json, else the root one), or (for checkpoints
    written by Megatron-LM) meta derived from rank 0's args."""
    root = Path(root)
    tracked = read_tracker(root) if (root / TRACKER).is_file() else None
    if tracked is not None and iteration_meta_path(root, tracked).is_file():
        return _parse_meta(iteration_meta_path(root, tracked))[0]
    if (root / META).is_file():
        meta, described = _parse_meta(root / META)
        if tracked is not None and described is not None and \
                iteration_dir_name(described) != iteration_dir_name(tracked):
            raise CheckpointError(f"{root / META}: describes iteration {described}, but {TRACKER} names {tracked} "
                                  f"and {iteration_meta_path(root, tracked)} is missing")
        return meta
    iteration = read_tracker(root)
    where, args = _first_rank_args(root, iteration)
    return llama_meta_from_args(args, where)


def llama_meta_from_args(args: Any, where: Path | str) -> CheckpointMeta:
    """The meta of a checkpoint written by Megatron-LM, from its args (`where`: the file they came from): a LLaMA
    architecture and every field we need present and valid; fields we do not need may hold anything."""
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{where}: 'args' is {type(args).__name__}, not Megatron-LM's argparse.Namespace")
    problems = mlm_compat.non_llama_settings(args)
    if problems:
        raise CheckpointError(f"{where}: not a LLaMA-architecture checkpoint: {', '.join(problems)}")
    try:
        return meta_from_args(args)
    except ShapeError as e:
        raise CheckpointError(f"{where}: args: {e}") from None
    except (AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: args lack a field the model shape needs ({type(e).__name__}: {e})") \
            from None


def _parse_meta(path: Path) -> tuple[CheckpointMeta, int | str | None]:
    """(meta, the iteration the file says it describes or None)."""
    try:
        d = json.loads(path.read_text())
        return CheckpointMeta.from_json(d), d.get("iteration")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: invalid ({e})") from None


def _first_rank_args(root: Path, iteration: int | str) -> tuple[Path, Any]:
    """(the file, the args) of a Megatron-LM checkpoint: rank 0's file, or a torch_dist common state."""
    folder = root / iteration_dir_name(iteration)
    if dist_ckpt.is_dist_dir(folder):
        index = dist_ckpt.read_index(folder)
        return folder, dist_ckpt.read_common(index).get("args")
    for pp in (1, 2):
        path = rank_path(root, iteration, 0, 0, pp)
        if path.is_file():
            state = load_rank_file(path)
            return path, state.get("args") if isinstance(state, dict) else None
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: missing ({root / TRACKER} names iteration {iteration})")
    raise CheckpointError(f"{folder}: no rank files (mp_rank_00*/{RANK_FILE}) and no torch_dist files "
                          f"({dist_ckpt.CONFIG_FILE}, {dist_ckpt.INDEX_FILE})")


def meta_from_args(a: argparse.Namespace) -> CheckpointMeta:
    dtype = "bfloat16" if getattr(a, "bf16", False) else "float16" if getattr(a, "fp16", False) else "float32"
    heads = a.num_attention_heads
    shape = LlamaShape(
        num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=heads,
        num_query_groups=a.num_query_groups if getattr(a, "group_query_attention", False) else heads,
        kv_channels=getattr(a, "kv_channels", None) or a.hidden_size // heads,
        vocab_size=getattr(a, "vocab_size", None) or a.padded_vocab_size,
        max_position_embeddings=a.max_position_embeddings, rope_theta=float(getattr(a, "rotary_base", 10000)),
        rope_scaling=RopeScaling(factor=factor) if (factor := mlm_compat.rope_scaling_factor_from_args(a)) else None,
        norm_eps=mlm_compat.norm_eps_from_args(a),
        tie_word_embeddings=not getattr(a, "untie_embeddings_and_output_weights", False), dtype=dtype)
    return CheckpointMeta(shape=shape, tp=a.tensor_model_parallel_size, pp=a.pipeline_model_parallel_size,
                          padded_vocab_size=a.padded_vocab_size,
                          make_vocab_size_divisible_by=getattr(a, "make_vocab_size_divisible_by", 128),
                          te_names=getattr(a, "transformer_impl", "local") == "transformer_engine")


def load_rank_file(path: Path, map_location: str = "cpu", mmap: bool = True) -> dict[str, Any]:
    """A rank file, read with checkpoint.safe_pickle: tensors, args of any Megatron-LM version (types we do not
    import become inert Opaque values), never running code; a code payload is refused."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing rank file")
    try:
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=False, pickle_module=safe_pickle)
    except safe_pickle.PayloadError as e:
        raise CheckpointError(f"{path}: refused: {e}") from None
    except Exception as e:  # noqa: BLE001 - a file that does not unpickle is the file's fault
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {' '.join(str(e).split())})") from None


def load_rank(root: str | Path, tp_rank: int, pp_rank: int, meta: CheckpointMeta | None = None,
              iteration: int | str | None = None) -> dict[str, Any]:
    """One rank's state ({"model": local-spec state dict, "args": ..., ...}), checked against its folder and the
    checkpoint's meta (parallel sizes, iteration, layers, tensor shapes). A torch_dist checkpoint gives the shard of
    rank (tp_rank, pp_rank) at the meta's (tp, pp), read by megatron-core (with megatron-core <= 0.16 under a
    multi-rank process group this is a collective: every rank calls it once)."""
    root = Path(root)
    meta = meta or read_meta(root)
    iteration = read_tracker(root) if iteration is None else iteration
    folder = root / iteration_dir_name(iteration)
    if dist_ckpt.is_dist_dir(folder):
        return _load_dist_rank(folder, meta, tp_rank, pp_rank)
    path = rank_path(root, iteration, tp_rank, pp_rank, meta.pp)
    state = load_rank_file(path)
    args = state.get("args") if isinstance(state, dict) else None
    sizes = (getattr(args, "tensor_model_parallel_size", None), getattr(args, "pipeline_model_parallel_size", None))
    if args is not None and sizes != (meta.tp, meta.pp):
        raise CheckpointError(f"{path}: written for tp={sizes[0]}, pp={sizes[1]}, but the checkpoint is "
                              f"tp={meta.tp}, pp={meta.pp}")
    _check_iteration(path, state, iteration)
    check_rank_state(path, state, meta, tp_rank, pp_rank, meta_source(root))
    return state


def _check_iteration(path: Path, state: Any, iteration: int | str) -> None:
    want = 0 if iteration == "release" else iteration
    got = state.get("iteration", want) if isinstance(state, dict) else want
    if got != want:
        raise CheckpointError(f"{path}: iteration {got!r} differs from the tracker's {iteration}")


def _load_dist_rank(folder: Path, meta: CheckpointMeta, tp_rank: int, pp_rank: int) -> dict[str, Any]:
    index = dist_ckpt.read_index(folder)
    state = dist_ckpt.read_common(index)
    pieces = dist_ckpt.rank_pieces(index, meta.shape, meta.tp, meta.pp, tp_rank, pp_rank, meta.padded_vocab_size)
    state["model"] = dist_ckpt.load_pieces(index, pieces)
    return state


def meta_source(root: str | Path) -> str:
    """Where a checkpoint's meta comes from, for messages: our megatron_prune.json, else Megatron-LM's args."""
    path = Path(root) / META
    return str(path) if path.is_file() else f"{root}'s Megatron-LM args"


def check_rank_files(root: Path, meta: CheckpointMeta, iteration: int | str) -> None:
    """Every rank file of a legacy checkpoint present, in its own folder, with the layers and shapes the meta
    implies. Reads only the pickles (tensors go to the meta device): milliseconds even for 7B."""
    source = meta_source(root)
    for pp_rank in range(meta.pp):
        for tp_rank in range(meta.tp):
            path = rank_path(root, iteration, tp_rank, pp_rank, meta.pp)
            if not path.is_file():
                raise CheckpointError(f"{path}: missing rank file (tp_rank={tp_rank}, pp_rank={pp_rank}, "
                                      f"tp={meta.tp}, pp={meta.pp})")
            check_rank_state(path, load_rank_file(path, map_location="meta", mmap=False), meta, tp_rank, pp_rank,
                             source)


def check_dist_files(folder: Path, meta: CheckpointMeta, iteration: int | str, source: str) -> None:
    """A torch_dist iteration directory: its config, index and chunk files, its common state's iteration, and the
    global shape of every tensor against the meta. Reads no tensor data."""
    index = dist_ckpt.read_index(folder)
    _check_iteration(folder / dist_ckpt.INDEX_FILE, dist_ckpt.read_common(index), iteration)
    check_dist_shapes(folder, {k: v.shape for k, v in index.tensors.items()}, meta, source)


@dataclass(frozen=True)
class OpenCheckpoint:
    """A Megatron checkpoint whose files were checked against its meta (what `open_checkpoint` returns)."""

    root: Path
    meta: CheckpointMeta        # at the parallel sizes it is read at
    iteration: int | str        # "release" for step-0 checkpoints
    format: str                 # "torch" (rank files) or "torch_dist"

    @property
    def folder(self) -> Path:
        return self.root / iteration_dir_name(self.iteration)

    def load_rank(self, tp_rank: int, pp_rank: int) -> dict[str, Any]:
        return load_rank(self.root, tp_rank, pp_rank, self.meta, self.iteration)

    def read_stages(self) -> "StageView":
        """The model stage by stage, lazily: rank files at their own (tp, pp), memory-mapped; a torch_dist
        checkpoint as one stage at TP=1, one layer at a time (its tensors do not depend on the sizes)."""
        if self.format == "torch":
            return StageView(self, self.meta.tp, self.meta.pp)
        return StageView(self, 1, 1)


@dataclass(frozen=True)
class StageView:
    ck: OpenCheckpoint
    tp: int
    pp: int

    def models(self, pp_rank: int) -> list:
        """The model state dicts of stage `pp_rank`, one per TP rank (lazy Mappings for torch_dist)."""
        ck = self.ck
        if ck.format == "torch":
            return [ck.load_rank(r, pp_rank)["model"] for r in range(self.tp)]
        index = dist_ckpt.read_index(ck.folder)
        meta = ck.meta.at(self.tp, self.pp)
        return [dist_ckpt.StageReader(index, dist_ckpt.rank_pieces(index, meta.shape, self.tp, self.pp, r, pp_rank,
                                                                     meta.padded_vocab_size))
                for r in range(self.tp)]


def read_args(ck: OpenCheckpoint) -> Any:
    """The Megatron-LM args a checkpoint stores (rank 0's file, or a torch_dist common state); may be None."""
    if ck.format == "torch_dist":
        return dist_ckpt.read_common(dist_ckpt.read_index(ck.folder)).get("args")
    state = load_rank_file(rank_path(ck.root, ck.iteration, 0, 0, ck.meta.pp), map_location="meta", mmap=False)
    return state.get("args") if isinstance(state, dict) else None


def checkpoint_format(root: str | Path, iteration: int | str | None = None) -> str:
    """"torch_dist" when the tracked iteration directory holds megatron-core's dist-checkpoint files, else "torch"."""
    root = Path(root)
    iteration = read_tracker(root) if iteration is None else iteration
    return "torch_dist" if dist_ckpt.is_dist_dir(root / iteration_dir_name(iteration)) else "torch"


def open_checkpoint(root: str | Path, tp: int | None = None, pp: int | None = None) -> OpenCheckpoint:
    """The one way into a Megatron checkpoint: tracker, meta, format, and every file checked against the meta
    before any tensor is read (rank files: record, layers, shapes; torch_dist: config, index, chunk files, the
    common state's iteration, global shapes). `tp`/`pp`: read a torch_dist checkpoint at these sizes (any that
    divide the model); a legacy one keeps the sizes it was written with (`reshard` changes them)."""
    root = Path(root)
    iteration = read_tracker(root)
    meta = read_meta(root)
    folder = root / iteration_dir_name(iteration)
    if not dist_ckpt.is_dist_dir(folder):
        check_rank_files(root, meta, iteration)
        return OpenCheckpoint(root, meta, iteration, "torch")
    check_dist_files(folder, meta, iteration, meta_source(root))
    want = (tp or meta.tp, pp or meta.pp)
    try:
        meta = meta.at(*want)
    except ShapeError as e:
        raise ShapeError(f"{root}: cannot be read at tp={want[0]}, pp={want[1]}: {e}") from None
    return OpenCheckpoint(root, meta, iteration, "torch_dist")
