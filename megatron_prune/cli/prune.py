"""torchrun --nproc-per-node TP -m megatron_prune prune --load CKPT --save OUT [target sizes | --plan FILE] ...

Prunes a TP-sharded (PP=1) Megatron LLaMA checkpoint, one process per TP rank, and writes pruned shards plus
`prune_plan.json` (global indices, re-appliable with --plan here or to an HF model with `prune-hf`).
Layer ids are 0-based, as in HF's model.layers.N.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_prune.cli.common import add_ckpt_format
from megatron_prune.errors import InputError


def add_arguments(p) -> None:
    from megatron_prune.prune.plan import IMPORTANCES

    p.add_argument("--load", required=True, help="input Megatron checkpoint (PP=1; TP = number of processes)")
    p.add_argument("--save", default=None,
                   help="output directory (must not exist or be empty); required except with --dry-run")
    p.add_argument("--tp", type=int, default=None,
                   help="the number of processes = the TP size the checkpoint is read at; a legacy --load must "
                        "have it (default: --load's), a torch_dist one is read at any")
    g = p.add_argument_group("target (omitted sizes are kept)")
    g.add_argument("--hidden-size-remain", type=int, help="hidden channels to keep")
    g.add_argument("--num-attention-heads-remain", type=int, help="query heads to keep")
    g.add_argument("--num-query-groups-remain", type=int,
                   help="query groups (KV heads) to keep (default: MHA stays MHA; GQA keeps its groups)")
    g.add_argument("--ffn-hidden-size-remain", type=int, help="FFN channels to keep")
    g.add_argument("--num-layers-remain", type=int,
                   help="layers to keep, the others dropped by lowest Block Influence (activation or taylor)")
    g.add_argument("--drop-layers", default=None, help="layer ids to drop, 0-based, e.g. 7,13,18,24")
    p.add_argument("--plan", default=None, help="re-apply a saved prune_plan.json instead of making a plan")
    p.add_argument("--prune-type", choices=["balance", "global"], default=None,
                   help="balance (default): every TP rank keeps the same counts, shards stay equal; global: the "
                        "best over all ranks, uneven shards (reshard before training)")
    p.add_argument("--importance", choices=IMPORTANCES, default=None,
                   help="how units are scored (default: activation): random; magnitude (weight norms, no data); "
                        "activation (Minitron: activation norms on calibration text, layers by Block Influence); "
                        "taylor (|sum of weight x gradient| of the calibration loss per unit, layers by Block "
                        "Influence; backward passes, about 3x activation's cost)")
    p.add_argument("--seed", type=int, default=1234, help="random plan seed (default 1234)")
    c = p.add_argument_group("calibration (activation / taylor importance; with a budget also the held-out windows)")
    c.add_argument("--calib-data", default=None,
                   help="text / jsonl file or indexed dataset prefix (default: the shipped English sample)")
    c.add_argument("--calib-samples", type=int, default=64, help="calibration sequences (default 64)")
    c.add_argument("--calib-seq-length", type=int, default=256, help="tokens per sequence (default 256)")
    c.add_argument("--calib-micro-batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    c.add_argument("--tokenizer", default=None, help="tokenizer for text calibration data (default: --load's)")
    _add_budget_arguments(p)
    p.add_argument("--check-only", action="store_true",
                   help="validate everything and print the target shape; no processes, nothing written")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --save")
    add_ckpt_format(p)
    p.add_argument("--allow-non-finite", action="store_true",
                   help="copy tensors holding NaN / Inf instead of refusing (checked by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print a JSON summary line (rank 0)")


def _add_budget_arguments(p) -> None:
    from megatron_prune.prune.search_space import DEFAULT_WIDTH_MULTIPLE, SearchLimits

    d = SearchLimits()
    b = p.add_argument_group("budget: search the sizes instead of giving them")
    b.add_argument("--target-params", default=None,
                   help="parameters to keep: a count (64047840, 6.4e7) or a share of the source's (50%%); "
                        "searches layers, hidden, heads per group and FFN for shapes within 95-100%% of it")
    b.add_argument("--target-memory-gb", default=None,
                   help="inference memory in GiB (2^30 bytes): bf16 weights + the KV cache of --memory-batch-size x "
                        "--memory-seq-length tokens. Alone: shapes within 95-100%% of it; with --target-params: "
                        "95-100%% of the parameters and at most this memory")
    b.add_argument("--memory-seq-length", type=int, default=None,
                   help="tokens per sequence in the KV cache of --target-memory-gb (default: the model's "
                        "max_position_embeddings, the longest context it serves)")
    b.add_argument("--memory-batch-size", type=int, default=1,
                   help="sequences in the KV cache of --target-memory-gb (default 1)")
    b.add_argument("--width-multiple", type=int, default=DEFAULT_WIDTH_MULTIPLE,
                   help=f"hidden and FFN sizes are multiples of this, or unchanged (default {DEFAULT_WIDTH_MULTIPLE}: "
                        f"group-quantized W4A16/W8A16 need columns %% 128 == 0; use e.g. 8 for tiny models); "
                        f"hand-given --hidden-size-remain / --ffn-hidden-size-remain off it get a one-line "
                        f"warning")
    b.add_argument("--max-depth-drop", type=float, default=d.max_depth_drop,
                   help=f"at most this fraction of the layers dropped (default {d.max_depth_drop})")
    b.add_argument("--max-width-drop", type=float, default=d.max_width_drop,
                   help=f"at most this fraction of hidden, heads per group and FFN removed (default "
                        f"{d.max_width_drop})")
    b.add_argument("--limits-of", default=None, metavar="MODEL",
                   help="measure --max-depth-drop / --max-width-drop from this model's sizes instead of --load's: "
                        "an HF directory or a Megatron checkpoint, e.g. the original of an already pruned --load, "
                        "so that the prunes together stay within the limits (`compress --steps` passes its source)")
    b.add_argument("--search-candidates", type=int, default=d.candidates,
                   help=f"how many shapes to evaluate by their loss: the maximal shapes of the budget window (no "
                        f"layer, head or width step up fits) ranked by an importance proxy from the calibration "
                        f"pass, the best this many (default {d.candidates})")
    b.add_argument("--megatron-only-shapes", action=argparse.BooleanOptionalAction, default=False,
                   help="also search shapes only megatron-core runs: hidden not a multiple of the heads, which "
                        "transformers >= 5 refuses to load (default: only shapes HF transformers loads)")
    b.add_argument("--search-eval-samples", type=int, default=16,
                   help="calibration windows held apart (never used for scores) on which every candidate's "
                        "loss is measured (default 16)")
    b.add_argument("--search-kd-iters", type=int, default=0,
                   help="distil each candidate this many steps from the unpruned model before measuring its "
                        "loss (slower, ranks by recoverability; default 0)")
    b.add_argument("--search-kd-lr", type=float, default=1e-4, help="AdamW learning rate of those steps (1e-4)")
    b.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=False,
                   help="with a budget: print the candidate table and stop (nothing written; run it as one "
                        "process, without torchrun)")


def build_config(args):
    from megatron_prune.prune.calib import CalibConfig
    from megatron_prune.prune.config import PruneConfig, SearchConfig
    from megatron_prune.prune.select import PruneTarget, layer_ids

    sizes = (args.hidden_size_remain, args.num_attention_heads_remain, args.num_query_groups_remain,
             args.ffn_hidden_size_remain, args.num_layers_remain, args.drop_layers)
    if args.plan and any(v is not None for v in sizes):
        raise InputError("--plan re-applies a saved plan: do not also give target sizes or --drop-layers")
    budget = args.target_params is not None or args.target_memory_gb is not None
    if not (budget or args.plan or any(v is not None for v in sizes)):
        raise InputError("nothing to prune: give target sizes (--hidden-size-remain, ... --num-layers-remain, "
                         "--drop-layers), a budget (--target-params, --target-memory-gb) or --plan (see --help)")
    if args.width_multiple < 1:
        raise InputError(f"--width-multiple must be a positive integer, got {args.width_multiple}")
    if budget and (args.plan or any(v is not None for v in sizes)):
        raise InputError("a budget (--target-params / --target-memory-gb) searches the sizes: do not also give "
                         "sizes, --drop-layers or --plan")
    if args.limits_of and not budget:
        raise InputError("--limits-of measures the drop limits of a budget search: give --target-params / "
                         "--target-memory-gb, or drop it")
    if budget and args.prune_type == "global":
        raise InputError("a budget searches balance-mode shapes (equal shards): drop --prune-type global")
    target = search = None
    if budget:
        search = SearchConfig(target_params=args.target_params, target_memory_gb=args.target_memory_gb,
                              memory_seq_length=args.memory_seq_length, memory_batch_size=args.memory_batch_size,
                              limits=_limits(args), eval_samples=args.search_eval_samples,
                              kd_iters=args.search_kd_iters, kd_lr=args.search_kd_lr)
    elif not args.plan:
        target = PruneTarget(hidden_size=args.hidden_size_remain, num_attention_heads=args.num_attention_heads_remain,
                             num_query_groups=args.num_query_groups_remain,
                             ffn_hidden_size=args.ffn_hidden_size_remain, num_layers=args.num_layers_remain,
                             drop_layers=layer_ids(args.drop_layers), mode=args.prune_type or "balance")
    calib = CalibConfig(data=args.calib_data, samples=args.calib_samples, seq_length=args.calib_seq_length,
                        micro_batch_size=args.calib_micro_batch_size, tokenizer=args.tokenizer)
    return PruneConfig(load=args.load, save=args.save, target=target, plan=args.plan,
                       importance=args.importance or "activation",
                       seed=args.seed, calib=calib, mode=args.prune_type if args.plan else None,
                       overwrite=args.overwrite, progress=not args.no_progress,
                       allow_non_finite=args.allow_non_finite, search=search, ckpt_format=args.ckpt_format)


def _limits(args):
    from megatron_prune.prune.search_space import SearchLimits

    from megatron_prune.prune.search_run import limits_reference

    reference = limits_reference(args.limits_of) if args.limits_of else None
    return SearchLimits(width_multiple=args.width_multiple, max_depth_drop=args.max_depth_drop,
                        max_width_drop=args.max_width_drop, candidates=args.search_candidates,
                        megatron_only_shapes=args.megatron_only_shapes, reference=reference)


def _shape_line(s) -> str:
    return (f"layers={s.num_layers} hidden={s.hidden_size} heads={s.num_attention_heads}/{s.num_query_groups} "
            f"ffn={s.ffn_hidden_size} kv_channels={s.kv_channels} params={s.num_params():,}")


def run(args) -> int:
    """User errors: one `error: ...` line (once, whichever rank hit it), exit code 2, nothing written."""
    from megatron_prune.cli.dist_entry import run_entry

    return run_entry(lambda: _run(args, int(os.environ.get("RANK", "0")) == 0))


def _search(args) -> int:
    """A budget with --dry-run: the search space and its maximal shapes as a table; with --check-only: the budget
    checked and the shapes counted. No processes, nothing written."""
    from megatron_prune.prune.display import format_table
    from megatron_prune.prune.run import search_shapes

    cfg = build_config(args)  # the same argument checks as a real run
    if args.check_only:  # everything a run checks (output, calibration data), then the count
        prep = _check(cfg, args)
        _check_tp(args.tp, cfg.load, prep.meta.tp)
        print(f"ok: {args.load} (tp={prep.meta.tp}, {prep.meta.shape.num_params():,} params) -> budget "
              f"{prep.space.budget.describe()}\n{prep.space.describe()}\n{_evaluated(prep.space)}")
        return 0
    meta, space = search_shapes(args.load, cfg.search, tp=args.tp)
    print(f"{args.load} (tp={meta.tp}, {meta.shape.num_params():,} params) -> budget {space.budget.describe()}\n"
          f"{space.describe()}\n{_evaluated(space)}")
    print(format_table(space))
    return 0


def _evaluated(space) -> str:
    k = min(space.limits.candidates, len(space.shapes))
    return (f"a run evaluates {k} of them by loss (--search-candidates): the {k} with the lowest damage estimate "
            f"of the importance proxy, from the calibration pass (random importance: the {k} closest to the budget)")


def _check_memory_flags(args) -> None:
    if args.target_memory_gb is None and (args.memory_seq_length is not None or args.memory_batch_size != 1):
        raise InputError("--memory-seq-length / --memory-batch-size size the KV cache of --target-memory-gb: "
                         "give --target-memory-gb too")


def _width_warning(cfg, width_multiple: int) -> str | None:
    """Hand-given widths off the --width-multiple grid: one warning line (rank 0 / --check-only)."""
    from megatron_prune.prune.display import width_warning

    t = cfg.target
    return width_warning(width_multiple, hidden=t.hidden_size, ffn=t.ffn_hidden_size) if t is not None else None


def one_process(args) -> bool:
    """--check-only and a budget's --dry-run run in one process, without torchrun (cli/prelaunch.py)."""
    return bool(args.check_only or args.dry_run)


def preflight(args, launch) -> int:
    """In the launching process (cli/prelaunch.py): everything --check-only checks, silently. Returns the
    processes: one per TP rank of --load."""
    _check_arguments(args)
    cfg = build_config(args)
    prep = _check(cfg, args)
    _check_tp(args.tp, cfg.load, prep.meta.tp)
    _check_does_something(cfg, prep.meta, prep.target)
    if launch.nproc not in (None, prep.meta.tp):
        raise InputError(f"{launch.name} {launch.nproc}, but {cfg.load} is a tp={prep.meta.tp} checkpoint: prune "
                         f"runs one process per TP rank")
    return prep.meta.tp


def _check_arguments(args) -> None:
    """Argument rules argparse cannot say."""
    if args.save is None and not args.dry_run:  # --dry-run writes nothing; argparse cannot say "unless"
        from megatron_prune.cli.common import name_env_flags

        raise InputError(name_env_flags("the following arguments are required: --save") + " (see --help)")
    _check_memory_flags(args)
    if args.dry_run and args.target_params is None and args.target_memory_gb is None:
        raise InputError("--dry-run goes with --target-params / --target-memory-gb (for given sizes use "
                         "--check-only)")


def _check_does_something(cfg, meta, target=None) -> None:
    """Sizes that equal the source's (no layer dropped) would write a copy of it: refused."""
    if cfg.target is None:
        return
    target = target or cfg.target.resolve(meta.shape, meta.tp)
    if target == meta.shape:
        raise InputError(f"nothing to prune: the target sizes equal {cfg.load}'s shape ({_shape_line(target)})")


def _run(args, rank0: bool) -> int:
    import contextlib

    from megatron_prune.checkpoint.megatron_io import read_meta
    from megatron_prune.cli.dist_entry import hold_output_lock
    from megatron_prune.config.shape import hf_config_warning
    from megatron_prune.model.agree import agree
    from megatron_prune.model.dist import init_process_group
    from megatron_prune.prune.run import prune_checkpoint

    _check_arguments(args)
    if (args.target_params is not None or args.target_memory_gb is not None) and (args.dry_run or args.check_only):
        return _search(args)
    if args.check_only:  # one process, no process group
        return _check_only(build_config(args), args)
    init_process_group()
    cfg = agree(build_config, args)
    agree(lambda: _check_does_something(cfg, read_meta(cfg.load)))
    with contextlib.ExitStack() as locks:
        agree(hold_output_lock, locks, cfg.save)
        result = prune_checkpoint(cfg)
    if rank0:
        for warning in (hf_config_warning(result.meta.shape), _width_warning(cfg, args.width_multiple)):
            if warning:
                print(warning, file=sys.stderr)
        gib = max(result.peak_rss) / 2**30
        if result.search:
            print(result.search.header())
            print(result.search.table())
        print(f"wrote {cfg.save}: {result.plan.summary()}; {result.seconds['total']:.1f} s, "
              f"peak RSS {gib:.2f} GiB/rank")
        if args.json:
            print(json.dumps({"save": cfg.save, "plan_sha256": result.plan.fingerprint(), "seconds": result.seconds,
                              "peak_rss": result.peak_rss, "target": result.meta.shape.to_dict(),
                              "rank_sizes": result.meta.rank_sizes,
                              "search": result.search.to_json() if result.search else None}))
    sys.stdout.flush()
    return 0


def _check(cfg, args):
    """prune.run.check, with a hint when the default importance (activation) finds no tokenizer for its
    calibration text: the user never chose to calibrate."""
    from megatron_prune.errors import UserError
    from megatron_prune.prune.run import check

    try:
        return check(cfg, tp=args.tp)
    except UserError as e:
        if args.importance is None and "tokenizer" in str(e) and not args.tokenizer:
            raise InputError(f"{e}; activation importance (the default) calibrates on text: give --tokenizer, or "
                             f"--importance magnitude / random") from None
        raise


def _check_tp(tp: int | None, load: str, actual: int) -> None:
    if tp is not None and tp != actual:
        raise InputError(f"--tp {tp}, but {load} is a tp={actual} checkpoint: prune runs one process per TP rank "
                         f"of its input (reshard it first to change TP)")


def _check_only(cfg, args) -> int:
    from megatron_prune.config.shape import hf_config_warning

    prep = _check(cfg, args)
    _check_tp(args.tp, cfg.load, prep.meta.tp)
    _check_does_something(cfg, prep.meta, prep.target)
    print(f"ok: {cfg.load} (tp={prep.meta.tp}) -> {_shape_line(prep.target)}")
    for warning in (hf_config_warning(prep.target), _width_warning(cfg, args.width_multiple)):
        if warning:
            print(warning, file=sys.stderr)
    return 0
