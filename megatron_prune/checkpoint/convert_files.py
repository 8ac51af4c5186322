"""File-level drivers for HF <-> Megatron conversion: validation, streaming one rank at a time, atomic output,
progress bars. The tensor logic lives in checkpoint.convert."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.atomic import atomic_dir, check_free_space, check_output_dir
from megatron_prune.checkpoint.consistency import NonFiniteError, describe_non_finite, is_finite
from megatron_prune.checkpoint.convert import hf_to_megatron_rank, megatron_to_hf_stage
from megatron_prune.checkpoint.dist_files import STAGING, finish_dist
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.checkpoint.hf_io import HFReader, copy_tokenizer_files, write_hf_checkpoint
from megatron_prune.checkpoint.keys import (OUTPUT, hf_expected_keys, is_ignored_hf_key, stage_tensor_maps,
                                            to_local_names)
from megatron_prune.config.shape import DTYPE_BYTES, DTYPES, canonical_dtype, torch_dtype

SUPPORTED_DTYPES = tuple(torch_dtype(d) for d in DTYPES)


def _check_hf_keys(reader: HFReader) -> None:
    shape = reader.shape
    expected = hf_expected_keys(shape.num_layers, shape.tie_word_embeddings)
    missing = [k for k in expected if k not in reader]
    if missing:
        raise CheckpointError(f"{reader.dir}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    allowed = set(expected) | ({OUTPUT.hf[0]} if shape.tie_word_embeddings else set())
    extra = [k for k in reader.keys() if k not in allowed and not is_ignored_hf_key(k)]
    if extra:
        raise CheckpointError(f"{reader.dir}: unexpected tensors for a LLaMA model, e.g. {extra[:3]}")
    reader.check_shapes()
    for key in expected:
        if reader[key].dtype not in SUPPORTED_DTYPES:
            raise CheckpointError(f"{reader.dir}: tensor {key!r} has unsupported dtype {reader[key].dtype}")


def hf_to_megatron(hf_dir: str | Path, save: str | Path, tp: int = 1, pp: int = 1, dtype: str | None = None,
                   divisible_by: int = 128, te_names: bool = False, overwrite: bool = False,
                   progress: bool = True, allow_non_finite: bool = False, ckpt_format: str = "torch"
                   ) -> mio.CheckpointMeta:
    """Convert an HF LLaMA directory to Megatron shards at (tp, pp), one output rank at a time. Every tensor is
    checked for NaN / Inf as it is made (unless allow_non_finite). torch_dist: the rank files are staged inside the
    temporary output and saved by megatron-core from there (dist_files)."""
    if ckpt_format not in mio.FORMATS:
        raise CheckpointError(f"--ckpt-format {ckpt_format!r} is not one of {', '.join(mio.FORMATS)}")
    check_output_dir(save, overwrite, inputs={"--hf-dir": hf_dir})
    with HFReader(hf_dir) as reader:
        src_dtype = reader.config.get("dtype") or reader.config.get("torch_dtype") or "float32"
        shape = reader.shape.replace(dtype=canonical_dtype(dtype or src_dtype))
        padded = shape.padded_vocab(divisible_by, tp)
        shape.check_parallel(tp, pp, padded)
        _check_hf_keys(reader)
        meta = mio.CheckpointMeta(shape=shape, tp=tp, pp=pp, padded_vocab_size=padded,
                                  make_vocab_size_divisible_by=divisible_by, te_names=te_names,
                                  hf_config=reader.config)
        meta = meta.with_history("convert", source=str(Path(hf_dir).resolve()), tp=tp, pp=pp, dtype=shape.dtype)
        args = mio.megatron_args(meta, ckpt_format=ckpt_format)
        copies = 2 if ckpt_format == "torch_dist" else 1  # the staged rank files, then the torch_dist files
        check_free_space(Path(save).parent, copies * shape.num_params() * DTYPE_BYTES[shape.dtype], save)
        with atomic_dir(save, overwrite) as tmp:
            out = tmp / STAGING if ckpt_format == "torch_dist" else tmp
            for pp_rank in range(pp):
                for tp_rank in range(tp):
                    _write_converted_rank(reader, meta, args, out, tp_rank, pp_rank, progress, allow_non_finite)
            if ckpt_format == "torch_dist":
                finish_dist(tmp, meta, args)
            copy_tokenizer_files(Path(hf_dir), tmp)
            mio.write_meta(tmp, meta)
            mio.write_tracker(tmp, "release")
    return meta


def _write_converted_rank(reader: HFReader, meta: mio.CheckpointMeta, args, out: Path, tp_rank: int,
                          pp_rank: int, progress: bool, allow_non_finite: bool) -> None:
    shape = meta.shape
    n_layers = shape.num_layers // meta.pp
    total = 6 * n_layers + (pp_rank == 0) + 2 * (pp_rank == meta.pp - 1)
    desc = f"rank tp{tp_rank}" + (f" pp{pp_rank}" if meta.pp > 1 else "")
    sources = {m: h for m, h, _ in stage_tensor_maps(shape.num_layers, meta.pp, pp_rank, shape.tie_word_embeddings)}
    with tqdm(total=total, desc=desc, unit="tensor", disable=not progress, leave=False) as bar:
        def on_tensor(mkey: str, t: torch.Tensor) -> None:
            if not allow_non_finite and not is_finite(t):  # checked while the new tensor is still in cache
                _raise_non_finite_hf(reader, sources[mkey], shape.dtype)
            bar.update()

        sd = hf_to_megatron_rank(lambda k: reader[k], shape, meta.tp, meta.pp, tp_rank, pp_rank,
                                 meta.padded_vocab_size, torch_dtype(shape.dtype), meta.te_names, on_tensor=on_tensor)
        mio.save_rank(out, "release", tp_rank, pp_rank, meta.pp, mio.rank_state(sd, args, 0))


def _raise_non_finite_hf(reader: HFReader, hf_keys, dtype: str) -> None:
    """Name the source tensor holding NaN / Inf, or overflowing the output dtype (rare path: reads it whole)."""
    for key in hf_keys:
        t = reader[key].full()
        if not is_finite(t):
            raise NonFiniteError(f"{reader[key].path}: tensor {key!r} holds non-finite values "
                                 f"({describe_non_finite(t)}); pass --allow-non-finite to convert it anyway")
        if not is_finite(t.to(torch_dtype(dtype))):
            raise NonFiniteError(f"{reader[key].path}: tensor {key!r} overflows {dtype}: values beyond its range "
                                 f"become Inf (convert with --dtype fp32, or pass --allow-non-finite)")
    raise NonFiniteError(f"{reader[hf_keys[0]].path}: tensor {hf_keys[0]!r} gives non-finite values")


def megatron_to_hf(load: str | Path, save: str | Path, dtype: str | None = None, overwrite: bool = False,
                   progress: bool = True, max_shard_bytes: int = 5 * 2**30,
                   allow_non_finite: bool = False) -> mio.CheckpointMeta:
    """Merge Megatron shards (any TP/PP, even or uneven, legacy or torch_dist) into an HF LLaMA directory. The
    checkpoint is checked against its meta before anything is written, and every merged tensor for NaN / Inf
    (unless allowed). Rank files are memory-mapped; a torch_dist checkpoint is read one layer at a time."""
    load = Path(load)
    check_output_dir(save, overwrite, inputs={"--load": load})
    ck = mio.open_checkpoint(load)
    meta = ck.meta
    shape = meta.shape.replace(dtype=canonical_dtype(dtype or meta.shape.dtype))
    config = shape.to_hf_config(meta.hf_config)
    config["vocab_size"] = shape.vocab_size
    check_free_space(Path(save).parent, shape.num_params() * DTYPE_BYTES[shape.dtype], save)
    stages = ck.read_stages()

    # one bar over the HF tensors written (reading the rank files is a small part of the time): it ends at its total
    bar = tqdm(total=len(hf_expected_keys(meta.shape.num_layers, meta.shape.tie_word_embeddings)), desc="export",
               unit="tensor", disable=not progress)

    def tensors():
        for pp_rank in range(stages.pp):
            sds = stages.models(pp_rank)
            for key, t in megatron_to_hf_stage(sds, meta.shape, stages.pp, pp_rank, torch_dtype(shape.dtype)):
                if not allow_non_finite and not is_finite(t):
                    _raise_non_finite_mg(ck, stages.pp, pp_rank, sds, key, shape.dtype)
                yield key, t
                bar.update()

    with bar, atomic_dir(save, overwrite) as tmp:
        write_hf_checkpoint(tmp, config, tensors(), max_shard_bytes)
        copy_tokenizer_files(load, tmp)
    return meta


def _raise_non_finite_mg(ck: mio.OpenCheckpoint, pp: int, pp_rank: int, sds, hf_key: str, dtype: str) -> None:
    """Name the rank file (or torch_dist directory) whose shard of `hf_key` holds NaN / Inf (rare path)."""
    s = ck.meta.shape
    mkey = next(m for m, h, _ in stage_tensor_maps(s.num_layers, pp, pp_rank, s.tie_word_embeddings)
                if hf_key in h)
    for tp_rank, sd in enumerate(sds):
        t = sd[mkey] if not isinstance(sd, dict) else to_local_names(sd)[mkey]
        if not is_finite(t):
            where = ck.folder if ck.format == "torch_dist" else mio.rank_path(ck.root, ck.iteration, tp_rank,
                                                                               pp_rank, pp)
            raise NonFiniteError(f"{where}: tensor {mkey!r} holds non-finite values ({describe_non_finite(t)}); "
                                 f"pass --allow-non-finite to export it anyway")
    raise NonFiniteError(f"{ck.root}: tensor {hf_key!r} overflows {dtype}: values beyond its range become Inf "
                         f"(export with --dtype fp32, or pass --allow-non-finite)")
