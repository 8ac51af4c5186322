"""File drivers for vocabulary pruning: validate everything first, then write the output atomically.

    prune_vocab(counts, keep, tokenizer, save, load=CKPT)     Megatron checkpoint (any TP/PP), one rank at a time
    prune_vocab(counts, keep, tokenizer, save, hf_dir=DIR)    HF checkpoint
    prune_vocab(counts, keep, tokenizer, save)                the tokenizer alone

`keep` is the final vocabulary size (`keep_min=True`: the older "top `keep` plus what must stay"; see plan.py).

The output holds the pruned tokenizer, `vocab_map.json` (old -> new ids) and, for checkpoints, the weights with
the embedding / output rows of the kept ids (Megatron: re-padded for its TP size) and the history entry.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

from megatron_prune.errors import InputError
from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.atomic import atomic_dir, check_output_dir
from megatron_prune.checkpoint import dist_files
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.checkpoint.hf_io import TOKENIZER_FILES, HFReader, write_hf_checkpoint
from megatron_prune.checkpoint.mlm_compat import plain_args
from megatron_prune.checkpoint.keys import EMBEDDING, OUTPUT
from megatron_prune.config.shape import read_hf_config
from megatron_prune.vocab.counts import check_counts_match, read_counts
from megatron_prune.vocab.plan import plan_vocab
from megatron_prune.vocab.slice import (HF_VOCAB_KEYS, VocabMap, config_token_ids, remap_config_ids, slice_rows,
                                        slice_stage, stage_vocab_keys)
from megatron_prune.vocab.tokenizer_files import (HF_NAME, SPM_NAME, STALE_FILES, TokenizerSource, remap_side_file,
                                                  side_file_ids)

VOCAB_MAP = "vocab_map.json"
Plan = Callable[[Iterable[int]], tuple[VocabMap, dict[str, Any]]]  # config-named ids -> kept ids, stats
# Root files that describe the old vocabulary: replaced by the pruned tokenizer's, else left out.
VOCAB_FILES = (SPM_NAME, HF_NAME, *STALE_FILES)


@dataclass
class PruneVocabResult:
    vmap: VocabMap
    stats: dict[str, Any]
    meta: mio.CheckpointMeta | None = None      # --load
    config: dict | None = None                  # --hf-dir
    notes: list[str] = field(default_factory=list)


def _root_files(src: Path, names: Iterable[str]) -> dict[str, bytes]:
    return {n: (src / n).read_bytes() for n in names if (src / n).is_file()}


def _carried_files(root: dict[str, bytes], produced: dict[str, bytes], vmap: VocabMap) -> tuple[dict, list]:
    """Source root files for the output: vocab-dependent ones are replaced by the pruned tokenizer's, renumbered,
    or left out (returned as notes)."""
    out, notes = {}, []
    for name, data in root.items():
        if name in produced or name == VOCAB_MAP:
            continue
        if name in VOCAB_FILES:
            notes.append(f"{name} of the source was left out (it describes the old vocabulary; "
                         f"pass the directory holding it as --tokenizer to prune it too)")
            continue
        out[name] = remap_side_file(name, data, vmap)
    return {**out, **produced}, notes


def _write_files(dst: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (dst / name).write_bytes(data)


def prune_vocab(counts: str | Path, keep: int, tokenizer: str | Path, save: str | Path, load: str | Path | None = None,
                hf_dir: str | Path | None = None, overwrite: bool = False, progress: bool = True,
                keep_min: bool = False, ckpt_format: str = "torch") -> PruneVocabResult:
    if load is not None and hf_dir is not None:
        raise InputError("give either --load (Megatron checkpoint) or --hf-dir (HF checkpoint), not both")
    check_output_dir(save, overwrite, inputs={"--load": load, "--hf-dir": hf_dir, "--tokenizer": tokenizer,
                                              "--counts": counts})
    source = TokenizerSource.read(tokenizer)
    fingerprint = source.fingerprint()
    token_counts = read_counts(counts)
    check_counts_match(token_counts, fingerprint, f"counts {counts}")

    def plan(extra: Iterable[int] = ()) -> tuple[VocabMap, dict[str, Any]]:
        return plan_vocab(source, token_counts, keep, extra, keep_min)

    if load is not None:
        return _prune_megatron(Path(load), source, plan, Path(save), overwrite, progress,
                               _details(counts, tokenizer, load), ckpt_format)
    if hf_dir is not None:
        return _prune_hf(Path(hf_dir), source, plan, Path(save), overwrite, _details(counts, tokenizer, hf_dir))
    vmap, stats = plan()
    files = source.pruned_files(vmap)
    with atomic_dir(save, overwrite) as tmp:
        _write_files(tmp, files)
        _write_map(tmp, vmap, stats, _details(counts, tokenizer, None))
    return PruneVocabResult(vmap, stats)


def _details(counts: str | Path, tokenizer: str | Path, src: str | Path | None) -> dict[str, Any]:
    return {"counts": str(Path(counts).resolve()), "tokenizer": str(Path(tokenizer).resolve()),
            "source": str(Path(src).resolve()) if src is not None else None}


def _write_map(dst: Path, vmap: VocabMap, stats: dict, details: dict) -> None:
    (dst / VOCAB_MAP).write_text(json.dumps(vmap.to_json(**stats, **details)) + "\n")


def _check_model_vocab(model_vocab: int, vmap: VocabMap, where: str) -> None:
    if model_vocab < vmap.old_size:
        raise CheckpointError(f"{where}: model vocabulary {model_vocab} is smaller than the tokenizer's "
                              f"{vmap.old_size} ids (wrong --tokenizer?)")


# ---------------------------------------------------------------------------- Megatron
def _prune_megatron(load: Path, source: TokenizerSource, plan: Plan, save: Path, overwrite: bool, progress: bool,
                    details: dict, ckpt_format: str = "torch") -> PruneVocabResult:
    ck = mio.open_checkpoint(load)
    meta, iteration = ck.meta, ck.iteration
    root = _root_files(load, sorted(f.name for f in load.iterdir() if f.is_file() and f.name not in
                                    (mio.TRACKER, mio.META)))
    extra = config_token_ids(meta.hf_config) | {i for n, d in root.items() for i in side_file_ids(n, d)}
    vmap, stats = plan(extra)
    _check_model_vocab(meta.shape.vocab_size, vmap, str(load))
    new_meta = _pruned_meta(meta, vmap, stats, details)
    files, notes = _carried_files(root, source.pruned_files(vmap), vmap)
    if ckpt_format not in mio.FORMATS:
        raise InputError(f"--ckpt-format {ckpt_format!r} is not one of {', '.join(mio.FORMATS)}")
    if meta.shape.vocab_size > vmap.old_size:
        notes.append(f"the model's {meta.shape.vocab_size - vmap.old_size} rows past the tokenizer's {vmap.old_size} "
                     "ids were dropped (no text produces them)")
    with atomic_dir(save, overwrite) as tmp:
        src = dist_files.as_legacy(ck, tmp / dist_files.SOURCE_STAGING)  # a torch_dist source as rank files
        out = tmp / dist_files.STAGING if ckpt_format == "torch_dist" else tmp
        for pp_rank in tqdm(range(meta.pp), desc="prune-vocab", unit="stage", disable=not progress):
            _write_stage(src.root, out, meta, new_meta, src.iteration, pp_rank, vmap)
        if ckpt_format == "torch_dist":
            dist_files.finish_dist(tmp, new_meta, mio.megatron_args(new_meta, ckpt_format="torch_dist"))
        shutil.rmtree(tmp / dist_files.SOURCE_STAGING, ignore_errors=True)
        _write_files(tmp, files)
        _write_map(tmp, vmap, stats, details)
        mio.write_meta(tmp, new_meta)
        mio.write_tracker(tmp, "release")
    if iteration != "release":
        notes.append(f"{load} is a training checkpoint (iteration {iteration}): optimizer and RNG state were not "
                     "carried (their embedding state no longer fits); the output is a release checkpoint")
    return PruneVocabResult(vmap, stats, meta=new_meta, notes=notes)


def _pruned_meta(meta: mio.CheckpointMeta, vmap: VocabMap, stats: dict, details: dict) -> mio.CheckpointMeta:
    shape = meta.shape.replace(vocab_size=vmap.new_size)
    padded = shape.padded_vocab(meta.make_vocab_size_divisible_by, meta.tp)
    shape.check_parallel(meta.tp, meta.pp, padded)
    hf_config = {**remap_config_ids(meta.hf_config, vmap), "vocab_size": vmap.new_size} if meta.hf_config else {}
    out = meta.replace(shape=shape, padded_vocab_size=padded, hf_config=hf_config)
    return out.with_history("prune-vocab", keep=stats["keep"], keep_mode=stats["keep_mode"],
                            old_vocab_size=meta.shape.vocab_size, vocab_size=vmap.new_size,
                            old_padded_vocab_size=meta.padded_vocab_size, padded_vocab_size=padded,
                            id_map=VOCAB_MAP, **details)


def _write_stage(load: Path, out: Path, meta: mio.CheckpointMeta, new_meta: mio.CheckpointMeta, iteration,
                 pp_rank: int, vmap: VocabMap) -> None:
    """All TP ranks of one pipeline stage: the vocab tables are merged over TP, sliced and split again."""
    states = [mio.load_rank(load, tp_rank, pp_rank, meta, iteration) for tp_rank in range(meta.tp)]
    keys = stage_vocab_keys(meta.pp, pp_rank, meta.shape.tie_word_embeddings)
    try:
        sds = slice_stage([s["model"] for s in states], vmap, meta.shape.vocab_size, new_meta.padded_vocab_size, keys)
    except InputError as e:
        raise CheckpointError(f"{load}: pipeline stage {pp_rank}: {e.args[0]}") from None
    for tp_rank, (state, sd) in enumerate(zip(states, sds)):
        args = _pruned_args(state.get("args"), new_meta)
        mio.save_rank(out, "release", tp_rank, pp_rank, meta.pp, mio.rank_state(sd, args, 0))


def _pruned_args(args, new_meta: mio.CheckpointMeta):
    """The rank's own args (training settings included) with the new vocabulary sizes."""
    if args is None:
        return mio.megatron_args(new_meta)
    args = plain_args(args)
    args.padded_vocab_size = new_meta.padded_vocab_size
    args.vocab_size = new_meta.shape.vocab_size
    return args


# ---------------------------------------------------------------------------- HF
def _prune_hf(hf_dir: Path, source: TokenizerSource, plan: Plan, save: Path, overwrite: bool, details: dict
              ) -> PruneVocabResult:
    config = read_hf_config(hf_dir)
    root = _root_files(hf_dir, TOKENIZER_FILES)
    extra = config_token_ids(config) | {i for n, d in root.items() for i in side_file_ids(n, d)}
    vmap, stats = plan(extra)
    new_config = {**remap_config_ids(config, vmap), "vocab_size": vmap.new_size}
    files, notes = _carried_files(root, source.pruned_files(vmap), vmap)
    with HFReader(hf_dir) as reader:
        _check_model_vocab(reader.shape.vocab_size, vmap, str(hf_dir))
        wanted = [EMBEDDING.hf[0]] + ([] if reader.shape.tie_word_embeddings else [OUTPUT.hf[0]])
        for key in wanted:
            if key not in reader or reader[key].shape[0] != reader.shape.vocab_size:
                raise CheckpointError(f"{hf_dir}: {key} missing or not of {reader.shape.vocab_size} rows")

        def tensors():
            for key in reader.keys():
                t = reader[key].full()
                yield key, slice_rows(t, vmap) if key in HF_VOCAB_KEYS else t

        with atomic_dir(save, overwrite) as tmp:
            write_hf_checkpoint(tmp, new_config, tensors())
            _write_files(tmp, files)
            _write_map(tmp, vmap, stats, details)
    return PruneVocabResult(vmap, stats, config=new_config, notes=notes)
