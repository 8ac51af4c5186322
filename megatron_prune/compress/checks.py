"""Everything the compress job can check before its first stage, in this one process: each stage's arguments by
that stage's own parser, the HF model and its TP sizes, the budget against the source shape (the search space
`prune` would build), the training data, the held-out text, and the training process count and batch layout.
Each problem is one line (a UserError) before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_prune.compress.plan import Command, Stage, _subcommand
from megatron_prune.compress.recipe import NO_BUDGET, Recipe
from megatron_prune.errors import InputError, UserError


def source_shape(hf_dir: str):
    from megatron_prune.config.shape import LlamaShape

    config = Path(hf_dir) / "config.json"
    if not config.is_file():
        raise InputError(f"{hf_dir}: no config.json, not an HF model directory (--hf-dir)")
    try:
        return LlamaShape.from_hf_config(json.loads(config.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{config}: not a LLaMA config ({e})") from None


def train_data_kinds(recipe: Recipe) -> tuple[bool, ...]:
    """Per --train-data entry: True for a text / jsonl file to tokenize, False for an indexed dataset prefix."""
    kinds = []
    for d in recipe.train_data:
        if Path(d).is_file():
            kinds.append(True)
        elif Path(d + ".bin").is_file() and Path(d + ".idx").is_file():
            kinds.append(False)
        else:
            raise InputError(f"--train-data {d}: no such file, nor an indexed dataset {d}.bin / {d}.idx")
    return tuple(kinds)


def check_job(recipe: Recipe, stages: list[Stage]) -> None:
    shape = source_shape(recipe.hf_dir)
    for tp, flag in ((recipe.tp, "--tp"), (recipe.training_tp, "--train-tp")):
        try:
            shape.check_parallel(tp)
        except Exception as e:  # ShapeError: name the flag
            raise InputError(f"{recipe.hf_dir}: {flag} {tp}: {e}") from None
    _check_output(recipe)
    parsed = {s.name: [_parse(c) for c in s.commands] for s in stages}
    for stage in stages:
        for cmd, args in zip(stage.commands, parsed[stage.name]):
            if stage.kind == "prune" and stage is next(s for s in stages if s.kind == "prune"):
                _check_budget(args, shape, recipe.tp, recipe)
            elif stage.kind == "train":
                _check_round_training(stage, args, cmd, recipe)
            elif stage.kind == "eval" and cmd.label == "original":
                _check_eval_text(args, recipe)
    if recipe.steps > 1:  # the last round's budget, at the TP it runs at: the trained student's
        last = [s for s in stages if s.kind == "prune"][-1]
        _check_budget(_parse(last.commands[0]), shape, recipe.training_tp, recipe)


def _parse(cmd: Command):
    from megatron_prune.cli.commands import make_parser

    name = _subcommand(cmd.args)
    _, parser = make_parser(name)
    return parser.parse_args(list(cmd.args[len(name.split()):]))


def _check_output(recipe: Recipe) -> None:
    from megatron_prune.checkpoint.atomic import check_no_overlap

    check_no_overlap(recipe.save, {"--hf-dir": recipe.hf_dir, "--eval-data": recipe.eval_data,
                                   "--calib-data": recipe.calib_data,
                                   **{f"--train-data {d}": d for d in recipe.train_data}})


def _check_budget(args, shape, tp: int, recipe: Recipe) -> None:
    """The search space of the budget, on the source shape at `tp` (what `prune --dry-run` lists)."""
    from megatron_prune.cli.prune import build_config
    from megatron_prune.prune.search_run import find_candidates

    try:
        cfg = build_config(args)  # a budget, or sizes given through --prune-args (not both, not neither)
    except InputError:
        if recipe.target_params is None and recipe.target_memory_gb is None:
            raise InputError(f"{recipe.source}: {NO_BUDGET}") from None
        raise
    if cfg.search is not None:
        find_candidates(shape, tp, recipe.hf_dir, cfg.search)


def _check_round_training(stage: Stage, args, cmd: Command, recipe: Recipe) -> None:
    """A round's training: its problems name the round's share of --train-iters (the train flags apply to every
    round, e.g. a --lr-warmup-iters longer than a round)."""
    try:
        _check_training(args, cmd, recipe)
    except UserError as e:
        if recipe.steps == 1:
            raise
        raise InputError(f"{stage.name}: {args.train_iters} of the --train-iters {recipe.train_iters} in --steps "
                         f"{recipe.steps} rounds: {e}") from None


def _check_training(args, cmd: Command, recipe: Recipe) -> None:
    """The training settings, the process count against TP x PP, the batch layout, and the data prefixes that
    exist already (text files are tokenized by the preprocess stage)."""
    from megatron_prune.cli.prelaunch import Launch
    from megatron_prune.cli.train import build_config
    from megatron_prune.train.data import check_data_paths

    cfg = build_config(args)
    launch = Launch(nproc=cmd.nproc, name="--nproc")
    nproc = launch.processes(cfg.tp * cfg.pp, f"--train-tp x --pp = {cfg.tp} x {cfg.pp}")
    cfg.layout(nproc)
    ready = [p for p in cfg.data_path if Path(p + ".bin").is_file()]
    if ready:
        check_data_paths(cfg.replace(data_path=tuple(ready)))


def _check_eval_text(args, recipe: Recipe) -> None:
    from megatron_prune.data.text import read_windows

    read_windows(args.text_file, recipe.hf_dir, args.seq_length, args.max_tokens)
