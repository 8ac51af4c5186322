"""Megatron-LM's legacy `torch` checkpoint layout, plus our `megatron_prune.json` beside it.

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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_prune.checkpoint.consistency import RANK_RECORD, check_rank_state, rank_record
from megatron_prune.checkpoint import mlm_compat
from megatron_prune.checkpoint.atomic import atomic_file, atomic_write_text
from megatron_prune.checkpoint.hf_io import CheckpointError
from megatron_prune.config.shape import LlamaShape, RopeScaling

TRACKER = "latest_checkpointed_iteration.txt"
META = "megatron_prune.json"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0

torch.serialization.add_safe_globals([argparse.Namespace])


@dataclass(frozen=True)
class CheckpointMeta:
    shape: LlamaShape
    tp: int
    pp: int
    padded_vocab_size: int
    make_vocab_size_divisible_by: int = 128
    te_names: bool = False
    hf_config: dict = field(default_factory=dict)
    history: tuple = ()
    # Uneven shards (global-mode pruning): {"groups": [[g_rank0, g_rank1, ...] per layer], "ffn": [[...] per layer]}
    # (heads per group are equal everywhere); None when every rank holds the same sizes.
    rank_sizes: dict | None = None

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(format=1, shape=self.shape.to_dict(), dtype=self.shape.dtype, history=list(self.history))
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CheckpointMeta":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["shape"] = LlamaShape.from_dict(d["shape"])
        kw["history"] = tuple(d.get("history", ()))
        return cls(**kw)

    def with_history(self, op: str, **details: Any) -> "CheckpointMeta":
        entry = {"op": op, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **details}
        return dataclasses.replace(self, history=(*self.history, entry))

    def replace(self, **changes: Any) -> "CheckpointMeta":
        return dataclasses.replace(self, **changes)


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
    args = _first_rank_args(root, iteration)
    problems = mlm_compat.non_llama_settings(args)
    if problems:
        raise CheckpointError(f"{root}: not a LLaMA-architecture checkpoint: {', '.join(problems)}")
    return meta_from_args(args)


def _parse_meta(path: Path) -> tuple[CheckpointMeta, int | str | None]:
    """(meta, the iteration the file says it describes or None)."""
    try:
        d = json.loads(path.read_text())
        return CheckpointMeta.from_json(d), d.get("iteration")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: invalid ({e})") from None


def _first_rank_args(root: Path, iteration: int | str) -> argparse.Namespace:
    for pp in (1, 2):
        path = rank_path(root, iteration, 0, 0, pp)
        if path.is_file():
            return load_rank_file(path)["args"]
    raise CheckpointError(f"{root}: no rank files under {iteration_dir_name(iteration)}/")


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
    """A rank file, weights_only. One written by Megatron-LM holds megatron-core enums in its args: those
    explicitly allow-listed types (mlm_compat.SAFE_GLOBAL_NAMES) are admitted, nothing else."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing rank file")
    try:
        try:
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
        except Exception as e:
            if not mlm_compat.is_unsupported_global(e):
                raise
        with torch.serialization.safe_globals(mlm_compat.megatron_core_safe_globals()):
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    """torch's weights_only refusal spans many lines; keep the refused global's name."""
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"{found.group(1)} is not an allowed type (not on megatron_prune's allow-list)"
    return " ".join(text.split())


def load_rank(root: str | Path, tp_rank: int, pp_rank: int, meta: CheckpointMeta | None = None,
              iteration: int | str | None = None) -> dict[str, Any]:
    """One rank's file, checked against its folder and the checkpoint's meta (parallel sizes, iteration, layers,
    tensor shapes)."""
    root = Path(root)
    meta = meta or read_meta(root)
    iteration = read_tracker(root) if iteration is None else iteration
    path = rank_path(root, iteration, tp_rank, pp_rank, meta.pp)
    state = load_rank_file(path)
    args = state.get("args")
    if args is not None and (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) != (meta.tp, meta.pp):
        raise CheckpointError(f"{path}: written for tp={args.tensor_model_parallel_size}, "
                              f"pp={args.pipeline_model_parallel_size}, but the checkpoint is tp={meta.tp}, pp={meta.pp}")
    want = 0 if iteration == "release" else iteration
    if state.get("iteration", want) != want:
        raise CheckpointError(f"{path}: iteration {state.get('iteration')} differs from the tracker's {iteration}")
    check_rank_state(path, state, meta, tp_rank, pp_rank, root)
    return state
