"""File driver for resharding: validate every source file first, then build one target rank at a time.

Source files are opened (mmap) per layer and released right after its tensors are copied out, so the resident set
stays near one output shard plus one layer, not the whole source checkpoint.
Optimizer state is not carried: the output is a `release` checkpoint (a fresh start for training), and the
history records the source iteration.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.atomic import atomic_dir, check_output_dir
from megatron_prune.checkpoint.convert import hf_to_megatron_rank
from megatron_prune.checkpoint.convert_files import check_rank_files
from megatron_prune.checkpoint.hf_io import CheckpointError
from megatron_prune.checkpoint.convert import split_tensor
from megatron_prune.checkpoint.keys import (EMBEDDING, FINAL_NORM, OUTPUT, stage_extra_state_keys, stage_layers,
                                            stage_tensor_maps, to_local_names, to_te_names)
from megatron_prune.checkpoint.reshard import (combine_shards, direct_sources, layer_of, merge_first_stage,
                                               merge_last_stage, merge_layer)
from megatron_prune.config.shape import ShapeError

ROOT_SKIP = {mio.TRACKER, mio.META}


class SourceCheckpoint:
    """A validated source checkpoint whose tensors are read layer by layer in HF order."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.meta = mio.read_meta(self.root)
        self.iteration = mio.read_tracker(self.root)
        check_rank_files(self.root, self.meta, self.iteration)
        self._check_consistent()
        self._cache: tuple[object, dict[str, torch.Tensor]] = (None, {})
        self._shards: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def _check_consistent(self) -> None:
        """Every rank file: same iteration and the same model args (catches mixed-up directories)."""
        want = 0 if self.iteration == "release" else self.iteration
        ref = None
        for pp_rank in range(self.meta.pp):
            for tp_rank in range(self.meta.tp):
                path = mio.rank_path(self.root, self.iteration, tp_rank, pp_rank, self.meta.pp)
                state = mio.load_rank_file(path)
                if state.get("iteration", want) != want:
                    raise CheckpointError(f"{path}: iteration {state.get('iteration')} differs from the tracker's "
                                          f"{self.iteration}")
                args = state.get("args")
                sig = None if args is None else tuple(getattr(args, k, None) for k in (
                    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "padded_vocab_size",
                    "tensor_model_parallel_size", "pipeline_model_parallel_size"))
                if ref is None:
                    ref = (sig, path)
                elif sig != ref[0]:
                    raise CheckpointError(f"{path}: model args {sig} differ from {ref[1]}'s {ref[0]}")
                del state

    def shard(self, pp_rank: int, tp_rank: int) -> dict[str, torch.Tensor]:
        """One source rank's state dict (mmap, local key names), cached until `release()`."""
        if (pp_rank, tp_rank) not in self._shards:
            sd = mio.load_rank(self.root, tp_rank, pp_rank, self.meta, self.iteration)["model"]
            self._shards[(pp_rank, tp_rank)] = to_local_names(sd)
        return self._shards[(pp_rank, tp_rank)]

    def release(self) -> None:
        """Drop cached shards and merged tensors, unmapping their files (bounds the resident set)."""
        self._shards.clear()
        self._cache = (None, {})

    def _stage_sds(self, pp_rank: int) -> list[dict[str, torch.Tensor]]:
        return [mio.load_rank(self.root, t, pp_rank, self.meta, self.iteration)["model"]
                for t in range(self.meta.tp)]

    def _load(self, what) -> dict[str, torch.Tensor]:
        shape, pp = self.meta.shape, self.meta.pp
        if what == "first":
            return merge_first_stage(self._stage_sds(0), shape)
        if what == "last":
            return merge_last_stage(self._stage_sds(pp - 1), shape)
        per = shape.num_layers // pp
        src_pp = what // per
        return merge_layer(self._stage_sds(src_pp), shape, what - src_pp * per, what)

    def get(self, hf_key: str) -> torch.Tensor:
        """The full tensor of an HF key; the tensors of its layer stay cached until another layer is asked for."""
        layer = layer_of(hf_key)
        what = layer if layer is not None else ("first" if hf_key == "model.embed_tokens.weight" else "last")
        if self._cache[0] != what:
            self._cache = (None, {})  # drop the previous layer (and its file mappings) before loading the next
            self._cache = (what, self._load(what))
        return self._cache[1][hf_key]


def build_rank(src: SourceCheckpoint, dst: mio.CheckpointMeta, tp_rank: int, pp_rank: int) -> dict:
    """Target rank's state dict: straight from the few source shards it overlaps when one TP size divides the
    other (even shards), else through full tensors in HF order (any sizes, uneven shards)."""
    direct = None if src.meta.rank_sizes else direct_sources(src.meta.tp, dst.tp, tp_rank)
    if direct is None:
        sd = hf_to_megatron_rank(src.get, dst.shape, dst.tp, dst.pp, tp_rank, pp_rank, dst.padded_vocab_size,
                                 te_names=dst.te_names)
        src.release()
        return sd
    ranks, k, j = direct
    shape, sd, group = dst.shape, {}, None
    for mkey, hf_keys, kind in stage_tensor_maps(shape.num_layers, dst.pp, pp_rank, shape.tie_word_embeddings):
        src_pp, src_key = _locate(src.meta, dst.pp, pp_rank, mkey, hf_keys)
        if (src_pp, src_key.split(".")[2] if src_key.startswith("decoder.layers.") else src_key) != group:
            src.release()  # next layer: unmap the previous one's files
            group = (src_pp, src_key.split(".")[2] if src_key.startswith("decoder.layers.") else src_key)
        if kind == "vocab" and dst.padded_vocab_size != src.meta.padded_vocab_size:
            sd[mkey] = split_tensor(kind, [src.get(hf_keys[0])], dst.tp, tp_rank, shape, dst.padded_vocab_size)
        else:
            sd[mkey] = combine_shards(kind, [src.shard(src_pp, r)[src_key] for r in ranks], k, j)
    src.release()
    sd.update({key: None for key in stage_extra_state_keys(shape.num_layers, dst.pp, pp_rank)})
    return to_te_names(sd) if dst.te_names else sd


def _locate(src: mio.CheckpointMeta, pp_dst: int, pp_rank: int, mkey: str, hf_keys) -> tuple[int, str]:
    """(source stage, source key) of a target key: layers are renumbered between stage layouts."""
    if mkey.startswith("decoder.layers."):
        local = int(mkey.split(".")[2])
        layer = stage_layers(src.shape.num_layers, pp_dst, pp_rank)[local]
        per = src.shape.num_layers // src.pp
        return layer // per, mkey.replace(f"layers.{local}.", f"layers.{layer % per}.", 1)
    if mkey == OUTPUT.mcore and hf_keys == EMBEDDING.hf:  # tied: the embedding is the output weight
        return 0, EMBEDDING.mcore
    if mkey in (FINAL_NORM.mcore, OUTPUT.mcore):
        return src.pp - 1, mkey
    return 0, mkey


def target_meta(meta: mio.CheckpointMeta, tp: int, pp: int, iteration) -> mio.CheckpointMeta:
    shape = meta.shape
    padded = shape.padded_vocab(meta.make_vocab_size_divisible_by, tp)
    try:
        shape.check_parallel(tp, pp, padded)
    except ShapeError as e:
        raise ShapeError(f"cannot reshard to tp={tp}, pp={pp}: {e}") from None
    out = meta.replace(tp=tp, pp=pp, padded_vocab_size=padded, rank_sizes=None)
    return out.with_history("reshard", source_tp=meta.tp, source_pp=meta.pp, tp=tp, pp=pp,
                            source_iteration=iteration, uneven_source=meta.rank_sizes is not None)


def reshard(load: str | Path, save: str | Path, tp: int, pp: int = 1, overwrite: bool = False,
            progress: bool = True) -> mio.CheckpointMeta:
    """Change the TP/PP size of a Megatron checkpoint (even or uneven shards), one output rank at a time."""
    check_output_dir(save, overwrite)
    if Path(load).resolve() == Path(save).resolve():
        raise ValueError(f"--save must differ from --load ({load})")
    src = SourceCheckpoint(load)
    dst = target_meta(src.meta, tp, pp, src.iteration)
    args = mio.megatron_args(dst)
    shape = dst.shape
    with atomic_dir(save, overwrite) as tmp:
        ranks = [(t, p) for p in range(pp) for t in range(tp)]
        for tp_rank, pp_rank in tqdm(ranks, desc="reshard", unit="rank", disable=not progress):
            sd = build_rank(src, dst, tp_rank, pp_rank)
            mio.save_rank(tmp, "release", tp_rank, pp_rank, pp, mio.rank_state(sd, args, 0))
            del sd
        _copy_root_files(src.root, tmp)
        mio.write_meta(tmp, dst)
        mio.write_tracker(tmp, "release")
    if src.iteration != "release":
        print(f"note: {load} is a training checkpoint (iteration {src.iteration}); weights were resharded, "
              "optimizer and RNG state were not carried (training restarts with a fresh optimizer)")
    return dst


def _copy_root_files(src: Path, dst: Path) -> None:
    """Tokenizer files, prune plans and the like travel with the checkpoint."""
    for f in src.iterdir():
        if f.is_file() and f.name not in ROOT_SKIP:
            shutil.copy2(f, dst / f.name)

