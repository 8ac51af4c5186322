"""torchrun --nproc-per-node N -m megatron_prune train --load CKPT --data-path PREFIX --train-iters N ... [--config F]

Recovery training on megatron-core. Options use Megatron-LM's names; `--config FILE` (YAML or JSON, keys with
dashes or underscores) supplies any of them, and options on the command line override the file. N must be a
multiple of tp x pp; the rest is data parallelism. Training resumes from --save when it already holds a
checkpoint; from a converted or pruned checkpoint (--load) it starts at iteration 0 with a fresh optimizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from megatron_prune.errors import InputError

# option -> (help, extra aliases). Types and defaults come from TrainConfig.
HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "load": ("checkpoint to start from (converted, pruned or training; legacy or torch_dist)", ()),
    "save": ("directory for training checkpoints and metrics.jsonl; resumed from when it holds one", ()),
    "save_interval": ("save every N iterations (0: only at the end)", ()),
    "keep_last": ("keep the K most recent iteration checkpoints (0: all)", ()),
    "finetune": ("take only the weights of a --load training checkpoint: iteration 0, fresh optimizer", ()),
    "exit_interval": ("save and stop at an iteration divisible by N (0: run to the end)", ()),
    "ckpt_format": ("format of the training checkpoints: torch (legacy rank files) or torch_dist (megatron-core "
                    "dist checkpoint: resumes at any TP / data-parallel size with its optimizer state)", ()),
    "tp": ("tensor-parallel size", ("--tensor-model-parallel-size",)),
    "pp": ("pipeline-parallel size", ("--pipeline-model-parallel-size",)),
    "sequence_parallel": ("sequence parallelism (with tp > 1)", ()),
    "use_distributed_optimizer": ("shard optimizer state over data-parallel ranks", ()),
    "use_te": ("build Transformer Engine layers (GPU with transformer_engine only); checkpoints then use TE names",
               ()),
    "micro_batch_size": ("sequences per micro-batch per data-parallel rank", ()),
    "global_batch_size": ("sequences per iteration over all data-parallel ranks", ()),
    "seq_length": ("tokens per sequence", ()),
    "train_iters": ("training iterations (or give --train-tokens)", ()),
    "train_tokens": ("training tokens, rounded up to whole global batches (instead of --train-iters)", ()),
    "lr": ("peak learning rate", ()),
    "min_lr": ("final learning rate of the decay", ()),
    "lr_warmup_iters": ("linear warm-up iterations from 0", ()),
    "lr_decay_style": ("learning-rate decay after warm-up", ()),
    "lr_decay_iters": ("decay iterations (default: the training iterations)", ()),
    "weight_decay": ("AdamW weight decay (not applied to norms)", ()),
    "adam_beta1": ("Adam beta1", ()), "adam_beta2": ("Adam beta2", ()), "adam_eps": ("Adam epsilon", ()),
    "clip_grad": ("clip the global gradient norm to this (0: off)", ()),
    "precision": ("bf16, fp16 (dynamic loss scaling) or fp32; also --bf16/--fp16/--fp32", ()),
    "loss_scale": ("fp16: constant loss scale (default: dynamic)", ()),
    "initial_loss_scale": ("fp16: initial dynamic loss scale", ()),
    "min_loss_scale": ("fp16: minimum dynamic loss scale", ()),
    "loss_scale_window": ("fp16: iterations without overflow before the scale grows", ()),
    "hysteresis": ("fp16: overflows tolerated before the scale shrinks", ()),
    "max_bad_steps": ("abort after this many consecutive steps with a non-finite loss or gradient", ()),
    "data_path": ("indexed dataset prefix(es): 'PREFIX ...' or weighted 'W1 PREFIX1 W2 PREFIX2 ...'", ()),
    "valid_data_path": ("separate validation blend (then --split is not used)", ()),
    "split": ("train,valid,test shares of --data-path documents", ()),
    "data_cache_path": ("where megatron-core caches dataset indices (default: SAVE/dataset_cache; without --save, "
                        "built in memory; never beside the data)", ()),
    "tokenizer": ("tokenizer (HF directory or SentencePiece .model; default: the files in --load)",
                  ("--tokenizer-model",)),
    "eod_mask_loss": ("no loss on end-of-document tokens", ()),
    "seed": ("random seed (data order, initialisation of new state)", ()),
    "skip_samples": ("start at this sample of the data order, to continue another run's data (e.g. the previous "
                     "prune/recover round's: its iterations x global batch); a resumed run counts on from it", ()),
    "eval_interval": ("evaluate every N iterations (0: only at the end)", ()),
    "eval_iters": ("validation global batches per evaluation (0: no evaluation)", ()),
    "log_interval": ("log every N iterations", ()),
    "metrics_file": ("JSON-lines metrics file (default: SAVE/metrics.jsonl)", ()),
    "tensorboard_dir": ("also write TensorBoard events here (needs tensorboard)", ()),
    "peak_tflops": ("peak TFLOP/s per device for MFU (default: known GPUs; none on CPU)", ()),
    "teacher_load": ("distil from this checkpoint (same TP and vocabulary; shape may differ)", ()),
    "kd_alpha": ("loss = alpha * KD + (1 - alpha) * LM", ()),
    "kd_temperature": ("distillation softmax temperature", ()),
}


def _type_of(field: dataclasses.Field):
    t = str(field.type)
    return int if t.startswith("int") else float if t.startswith("float") else str


# Settings whose default is not the dataclass's: the checkpoint's parallel sizes, and CPU_DEFAULTS without CUDA.
FROM_CHECKPOINT = ("tp", "pp")


def _default_text(f: dataclasses.Field) -> str:
    from megatron_prune.train.config import CPU_DEFAULTS

    if f.name in FROM_CHECKPOINT:
        return " (default: the --load checkpoint's)"
    if f.default in (None, (), ""):
        return ""
    if f.name in CPU_DEFAULTS:
        return f" (default: {f.default}; {CPU_DEFAULTS[f.name]} on a machine without CUDA)"
    return f" (default: {f.default})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from megatron_prune.train.config import CKPT_FORMATS, LR_DECAY_STYLES, PRECISIONS, TrainConfig

    p.add_argument("--config", default=None, help="YAML or JSON file of these settings (command line wins)")
    for f in dataclasses.fields(TrainConfig):
        text, aliases = HELP[f.name]
        flags = [f"--{f.name.replace('_', '-')}", *aliases]
        kw: dict = dict(dest=f.name, default=argparse.SUPPRESS, help=text + _default_text(f))
        if str(f.type) == "bool":
            p.add_argument(*flags, action="store_const", const=True, **kw)
        elif str(f.type).startswith("tuple"):
            p.add_argument(*flags, nargs="+", metavar="PATH", **kw)
        elif f.name in ("lr_decay_style", "precision", "ckpt_format"):
            choices = {"lr_decay_style": LR_DECAY_STYLES, "precision": PRECISIONS, "ckpt_format": CKPT_FORMATS}
            p.add_argument(*flags, choices=choices[f.name], **kw)
        else:
            p.add_argument(*flags, type=_type_of(f), metavar=f.name.upper(), **kw)
    for name in ("bf16", "fp16", "fp32"):
        p.add_argument(f"--{name}", dest="precision", action="store_const", const=name, default=argparse.SUPPRESS,
                       help=f"same as --precision {name}")
    p.add_argument("--no-save", action="store_true", help="train without --save: keep no checkpoint and no "
                   "metrics.jsonl (a run without --save is refused unless this says it is meant)")


def _settings(args: argparse.Namespace) -> dict:
    """--config file < explicit command-line options (the defaults fill in the rest)."""
    from megatron_prune.train.config import read_config_file

    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "no_save", "verbose")})
    return values


def _defaults(values: dict) -> dict:
    """The machine's defaults (CPU_DEFAULTS without CUDA) and the checkpoint's TP / PP when readable: a run on a
    converted or pruned checkpoint needs no --tp. An unreadable --load is left to the run's own check."""
    import torch

    from megatron_prune.errors import UserError
    from megatron_prune.train.checkpointing import find_resume_point
    from megatron_prune.train.config import machine_defaults

    out = machine_defaults(torch.cuda.is_available())
    if values.get("load") and not all(k in values for k in FROM_CHECKPOINT):
        try:
            meta = find_resume_point(values["load"], values.get("save")).meta
            out.update(tp=meta.tp, pp=meta.pp)
        except (UserError, OSError):
            pass
    return out


def build_config(args: argparse.Namespace):
    """TrainConfig from defaults < --config file < explicit command-line options."""
    from megatron_prune.train.config import TrainConfig

    values = _settings(args)
    cfg = TrainConfig.from_mapping({**_defaults(values), **values}, source=args.config or "arguments")
    no_save = getattr(args, "no_save", False)
    if cfg.save is None and not no_save:
        raise InputError("--save is required: training checkpoints and metrics.jsonl go there (give --no-save to "
                         "train and keep nothing)")
    if cfg.save is not None and no_save:
        raise InputError(f"--no-save, but --save {cfg.save} is given: drop one of them")
    return cfg


def preflight(args: argparse.Namespace, launch) -> int:
    """Everything a run checks before its first collective, in the launching process (cli/prelaunch.py): the
    settings, the checkpoint to start from (and the teacher), the data, the tokenizer, and the process count
    against TP x PP and the batch sizes. Returns the processes per node: `launch`'s, else the node's GPUs with
    CUDA, else TP x PP (one data-parallel rank)."""
    from megatron_prune.train.checkpointing import find_resume_point
    from megatron_prune.train.data import check_data_paths

    cfg = build_config(args)
    point = find_resume_point(cfg.load, cfg.save)
    nproc = launch.processes(cfg.tp * cfg.pp, f"--tp x --pp = {cfg.tp} x {cfg.pp}")
    cfg.layout(nproc * launch.nnodes)
    _check_checkpoint(point.meta, point.root, cfg)
    if cfg.teacher_load:
        from megatron_prune.checkpoint.megatron_io import read_meta

        _check_checkpoint(read_meta(cfg.teacher_load), cfg.teacher_load, cfg)
    check_data_paths(cfg)
    _check_tokenizer(cfg, point.meta)
    return nproc


def _check_checkpoint(meta, root, cfg) -> None:
    from types import SimpleNamespace

    from megatron_prune.model.load import check_loadable

    meta.shape.check_parallel(cfg.tp, cfg.pp)
    check_loadable(meta, SimpleNamespace(tp=cfg.tp, pp=cfg.pp), root)


def _check_tokenizer(cfg, meta) -> None:
    from pathlib import Path

    from megatron_prune.data.tokenizers import load_tokenizer

    source = Path(cfg.tokenizer or cfg.load)
    if load_tokenizer(source).vocab_size > meta.shape.vocab_size:
        raise InputError(f"tokenizer {source} has more tokens than the model's {meta.shape.vocab_size} (pass the "
                         f"model's own tokenizer with --tokenizer)")


def run(args: argparse.Namespace) -> int:
    from megatron_prune.cli.dist_entry import run_entry

    return run_entry(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    """On every rank; failures are reported once by cli.dist_entry (user errors: one line, exit 2)."""
    import contextlib

    from megatron_prune.cli.dist_entry import hold_output_lock
    from megatron_prune.model.agree import agree
    from megatron_prune.model.dist import init_process_group
    from megatron_prune.train.loop import train

    init_process_group()
    cfg = agree(build_config, args)
    with contextlib.ExitStack() as locks:
        if cfg.save:
            agree(hold_output_lock, locks, cfg.save, inside=True)
        result = train(cfg)  # TrainingAborted: every rank stops alike, reported once (cli.dist_entry)
    if int(os.environ.get("RANK", "0")) == 0:  # one line for the job, not one per rank
        print(f"done: iteration {result.iteration}" + (f", checkpoint {cfg.save}" if cfg.save else ""),
              file=sys.stderr, flush=True)
    return 0
