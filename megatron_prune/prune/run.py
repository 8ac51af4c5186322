"""The distributed pruner: one process per TP rank (torchrun), PP=1.

    check(cfg)             every user error, in one process, before any work (the CLI's --check-only)
    search_shapes(...)     `--target-params` / `--target-memory-gb`: candidate shapes for a budget, in one process
    prune_checkpoint(cfg)  on every rank: load the shard (mmap), make or read the plan, check that every rank
                           holds the same plan, apply it, write (each rank its file into a temp dir, barrier,
                           rank 0 writes plan + meta + tracker last and renames)
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_prune.errors import InputError
from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.atomic import check_free_space, check_output_dir, temp_name
from megatron_prune.checkpoint.consistency import NonFiniteError, describe_non_finite, is_finite
from megatron_prune.checkpoint.dist_files import save_dist_shard
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.checkpoint.hf_io import copy_tokenizer_files
from megatron_prune.config.shape import DTYPE_BYTES, LlamaShape
from megatron_prune.model.agree import everywhere
from megatron_prune.prune.apply import apply_rank, pruned_meta, target_shape
from megatron_prune.prune.plan import METHODS, PlanError, PrunePlan
from megatron_prune.prune.scoring import MODEL_METHODS
from megatron_prune.prune.search_run import SEARCH_FILE, SearchConfig, SearchReport
from megatron_prune.prune.search_space import Budget, BudgetError, Candidate, SearchLimits, make_budget, search
from megatron_prune.prune.select import PruneTarget

PLAN_FILE = "prune_plan.json"
SAMPLE_TEXT = Path(__file__).resolve().parent.parent / "data" / "samples" / "train.jsonl"
IMPORTANCES = tuple(m for m in METHODS if m != "manual")  # "manual": a plan given by hand, not a scoring method


@dataclass(frozen=True)
class CalibConfig:
    data: str | None = None        # text / jsonl file, or an indexed dataset prefix; None: the shipped sample
    samples: int = 64
    seq_length: int = 256
    micro_batch_size: int = 4
    tokenizer: str | None = None   # for text; default: the checkpoint's own tokenizer files

    def __post_init__(self) -> None:
        for name in ("samples", "seq_length", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"calibration {name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class PruneConfig:
    load: str
    save: str
    target: PruneTarget | None = None   # what to keep (made into a plan), or
    plan: str | None = None             # a saved plan to re-apply
    importance: str = "random"
    seed: int = 1234
    calib: CalibConfig = field(default_factory=CalibConfig)
    mode: str | None = None             # with `plan`: override the plan's mode (global accepts uneven shards)
    overwrite: bool = False
    progress: bool = True
    allow_non_finite: bool = False      # else pruned tensors holding NaN / Inf are refused before writing
    search: SearchConfig | None = None  # or a parameter budget: search the sizes (prune.search_run)
    ckpt_format: str = "torch"          # output: Megatron-LM's legacy rank files, or torch_dist

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.target, self.plan, self.search)) != 1:
            raise InputError("give one of: target sizes, --plan FILE, a budget (--target-params N / "
                             "--target-memory-gb G)")
        if self.importance not in IMPORTANCES:
            raise InputError(f"--importance {self.importance!r} is not one of {', '.join(IMPORTANCES)}")
        if self.ckpt_format not in mio.FORMATS:
            raise InputError(f"--ckpt-format {self.ckpt_format!r} is not one of {', '.join(mio.FORMATS)}")

    def inputs(self) -> dict[str, str | None]:
        """Every path this run reads (the output must not overlap any of them)."""
        return {"--load": self.load, "--plan": self.plan, "--calib-data": self.calib.data,
                "--tokenizer": self.calib.tokenizer}


@dataclass(frozen=True)
class Prepared:
    meta: mio.CheckpointMeta
    iteration: int | str
    target: LlamaShape
    plan: PrunePlan | None
    candidates: tuple[Candidate, ...] = ()   # the budget search's shapes (cfg.search)
    budget: Budget | None = None


@dataclass(frozen=True)
class PruneResult:
    plan: PrunePlan
    meta: mio.CheckpointMeta
    seconds: dict
    peak_rss: list[int]   # bytes, per TP rank
    search: SearchReport | None = None


def check_input(load: str | Path, tp: int | None = None) -> tuple[mio.CheckpointMeta, int | str]:
    """(meta, iteration) of a checkpoint the pruner can read: complete rank files, PP=1, even shards (a torch_dist
    checkpoint is read at `tp`, default the size it was written with, and PP=1)."""
    load = Path(load)
    ck = mio.open_checkpoint(load, tp=tp, pp=1 if mio.checkpoint_format(load) == "torch_dist" else None)
    meta, iteration = ck.meta, ck.iteration
    if meta.pp != 1:
        raise CheckpointError(f"{load}: pp={meta.pp}; the pruner needs PP=1: reshard to PP=1 first "
                              f"(python -m megatron_prune reshard --load {load} --pp 1 --tp {meta.tp} ...)")
    if meta.rank_sizes:
        raise CheckpointError(f"{load}: shards are uneven (global-mode pruning); reshard it before pruning again")
    return meta, iteration


def search_shapes(load: str | Path, target_params: str | None, limits: SearchLimits, *,
                  memory_gb: str | None = None, seq_length: int | None = None, batch_size: int = 1,
                  tp: int | None = None) -> tuple[mio.CheckpointMeta, Budget, list[Candidate]]:
    """(meta, budget, candidate shapes) for `--target-params` and/or `--target-memory-gb` (seq_length: the KV
    cache's, default the model's max_position_embeddings), single process, no tensors read."""
    meta, _ = check_input(load, tp)
    budget = make_budget(meta.shape, target_params, memory_gb, seq_length, batch_size)
    try:
        return meta, budget, search(meta.shape, meta.tp, budget, limits)
    except BudgetError as e:
        raise BudgetError(f"{load}: {e}") from None


def check(cfg: PruneConfig, tp: int | None = None) -> Prepared:
    """Validate checkpoint, target or plan, calibration data and output directory; no tensors are read. `tp`: the
    job's TP size (a torch_dist checkpoint is read at it)."""
    load = Path(cfg.load)
    meta, iteration = check_input(load, tp)
    check_output_dir(cfg.save, cfg.overwrite, inputs=cfg.inputs())
    plan, candidates, budget = None, (), None
    if cfg.plan:
        plan = PrunePlan.load(cfg.plan)
        plan.check_source(meta.shape)
        plan.check_tp(meta.tp, cfg.mode)
        target = target_shape(plan, meta.shape)
    elif cfg.search:
        sc = cfg.search
        _, budget, found = search_shapes(load, sc.target_params, sc.limits, memory_gb=sc.target_memory_gb,
                                         seq_length=sc.memory_seq_length, batch_size=sc.memory_batch_size, tp=tp)
        candidates, target = tuple(found), max(found, key=lambda c: c.params).shape  # free space for any
        check_search_importance(cfg.importance, meta.shape, candidates)
        _calib_source(cfg)
    else:
        target = cfg.target.resolve(meta.shape, meta.tp)
        if target.num_layers < meta.shape.num_layers and not cfg.target.drop_layers \
                and cfg.importance == "magnitude":
            raise PlanError("choosing layers to drop needs Block Influence (--importance activation or taylor) "
                            "or --drop-layers; magnitude importance has no layer scores")
        if cfg.importance in MODEL_METHODS:
            _calib_source(cfg)
    check_free_space(Path(cfg.save).parent, target.num_params() * DTYPE_BYTES[target.dtype], cfg.save)
    return Prepared(meta=meta, iteration=iteration, target=target, plan=plan, candidates=candidates, budget=budget)


def check_search_importance(importance: str, src: LlamaShape, candidates: tuple[Candidate, ...]) -> None:
    deeper = [c for c in candidates if c.shape.num_layers < src.num_layers]
    if importance == "magnitude" and deeper:
        raise PlanError(f"{len(deeper)} of the {len(candidates)} candidate shapes drop layers (e.g. "
                        f"{deeper[0].line()}), which needs layer scores: use --importance activation or taylor, or "
                        f"--max-depth-drop 0 with magnitude")


# ----------------------------------------------------------------------------- calibration data
def _calib_source(cfg: PruneConfig) -> tuple[str, Path]:
    """('indexed', prefix) or ('text', file)."""
    data = cfg.calib.data or str(SAMPLE_TEXT)
    prefix = data[:-4] if data.endswith((".bin", ".idx")) else data
    if Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file():
        return "indexed", Path(prefix)
    if Path(data).is_file():
        return "text", Path(data)
    raise InputError(f"--calib-data {data}: neither a text/jsonl file nor an indexed dataset prefix "
                            f"(PREFIX.bin + PREFIX.idx)")


def calibration_windows(cfg: PruneConfig, vocab: int, count: int) -> tuple[torch.Tensor, dict]:
    """Up to `count` [n, seq_length + 1] token windows (the same on every rank) and where they came from."""
    from megatron_prune.model.evaluate import token_windows

    c = cfg.calib
    kind, path = _calib_source(cfg)
    want = count * c.seq_length
    if kind == "indexed":
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds, ids = IndexedDataset(str(path)), []
        for i in range(len(ds)):
            ids += ds[i].tolist()
            if len(ids) > want:
                break
        windows = token_windows(ids, c.seq_length, want)
    else:
        from megatron_prune.cli.eval import read_windows

        windows = read_windows(str(path), c.tokenizer or cfg.load, c.seq_length, want)
    windows = windows[:count]
    if int(windows.max()) >= vocab:
        raise InputError(f"calibration token id {int(windows.max())} >= vocab size {vocab}: the tokenizer or "
                         f"dataset does not belong to this model")
    return windows, {"source": str(path), "kind": kind}


def windows_fingerprint(windows: torch.Tensor, where: dict) -> dict:
    digest = hashlib.sha256(windows.numpy().astype("int64").tobytes()).hexdigest()
    return {**where, "samples": len(windows), "seq_length": windows.shape[1] - 1,
            "tokens": int(windows[:, 1:].numel()), "sha256": digest}


def calibration_tokens(cfg: PruneConfig, vocab: int) -> tuple[torch.Tensor, dict]:
    """[samples, seq_length + 1] token windows (the same on every rank) and their fingerprint."""
    windows, where = calibration_windows(cfg, vocab, cfg.calib.samples)
    return windows, windows_fingerprint(windows, where)


# ----------------------------------------------------------------------------- making the plan
def make_plan(cfg: PruneConfig, prep: Prepared, sd: dict) -> PrunePlan:
    from megatron_prune.prune.select import make_plan as select

    meta, spec = prep.meta, cfg.target
    if cfg.importance == "random":
        from megatron_prune.prune.random_plan import random_plan

        return random_plan(meta.shape, spec, cfg.seed, meta.tp)
    if cfg.importance == "magnitude":
        from megatron_prune.prune.importance import magnitude_scores

        scores = magnitude_scores(sd, meta.shape)
        return select(scores, meta.shape, spec, meta.tp, "magnitude", seed=cfg.seed)
    tokens, fingerprint = calibration_tokens(cfg, meta.shape.vocab_size)
    scores = activation_scores(cfg, meta, tokens)  # activation or taylor (score_model dispatches)
    return select(scores, meta.shape, spec, meta.tp, cfg.importance, seed=cfg.seed, calibration=fingerprint)


def activation_scores(cfg: PruneConfig, meta: mio.CheckpointMeta, tokens: torch.Tensor):
    from megatron_prune.prune.scoring import loaded_model, score_model

    with loaded_model(cfg.load, meta.tp, cfg.calib.seq_length, cfg.seed) as model:
        return score_model(cfg.importance, model, meta.shape, tokens, cfg.calib.micro_batch_size,
                           progress=cfg.progress and dist.get_rank() == 0)


def check_same_plan(plan: PrunePlan) -> None:
    """Every rank must apply the same plan (scores could in principle diverge); compare fingerprints."""
    from megatron_prune.model.agree import check_identical

    check_identical(plan.fingerprint(), "plans")


# ----------------------------------------------------------------------------- the whole run, on every rank
def prune_checkpoint(cfg: PruneConfig) -> PruneResult:
    from megatron_prune.model.agree import agree
    from megatron_prune.model.dist import init_process_group

    init_process_group()
    world, rank = dist.get_world_size(), dist.get_rank()
    prep = agree(_check_job, cfg, world)  # every rank validates before the first collective; one report
    meta = prep.meta
    times = {}
    t0 = time.perf_counter()
    report = None
    if cfg.search:  # before the shard is mapped below: the search holds its own loaded copy of it
        from megatron_prune.prune.search_run import search_plan

        plan, report = search_plan(cfg, meta, list(prep.candidates), prep.budget)
    state = agree(mio.load_rank, cfg.load, rank, 0, meta, prep.iteration)  # this rank's own file (mmap)
    if not cfg.search:
        plan = prep.plan or make_plan(cfg, prep, state["model"])
    if prep.plan and cfg.mode:
        plan = plan.replace(mode=cfg.mode)
    check_same_plan(plan)
    times["plan"] = time.perf_counter() - t0
    dropper = PageDropper(mio.rank_path(Path(cfg.load), prep.iteration, rank, 0, 1))
    sd = apply_rank(state["model"], plan, meta.tp, rank, meta.te_names, release=dropper)
    del state
    new_meta = pruned_meta(meta, plan, source=str(Path(cfg.load).resolve()), tp=meta.tp)
    times["apply"] = time.perf_counter() - t0 - times["plan"]
    args = mio.megatron_args(new_meta, ckpt_format=cfg.ckpt_format)
    source = mio.rank_path(Path(cfg.load), prep.iteration, rank, 0, 1)
    if cfg.ckpt_format == "torch_dist":  # a collective save: every rank's checks agreed on before it
        agree(_check_dist_output, cfg, new_meta, source, sd)

    def write_rank(tmp: Path) -> None:
        if cfg.ckpt_format == "torch_dist":
            save_dist_shard(tmp, new_meta, sd, rank, 0, args)
            return
        if not cfg.allow_non_finite:
            check_finite_state(source, sd)
        mio.save_rank(tmp, "release", rank, 0, 1, mio.rank_state(sd, args, 0))

    write_distributed(cfg, rank, write_rank, lambda tmp: _finalize(tmp, cfg, new_meta, plan, report))
    times["total"] = time.perf_counter() - t0
    rss = [None] * world
    dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return PruneResult(plan=plan, meta=new_meta, seconds=times, peak_rss=rss, search=report)


def check_finite_state(source: Path, sd: dict) -> None:
    """Pruned tensors (in memory, just made) holding NaN / Inf: named with the source rank file."""
    for key, t in sd.items():
        if isinstance(t, torch.Tensor) and not is_finite(t):
            raise NonFiniteError(f"{source}: tensor {key!r} (after pruning) holds non-finite values "
                                 f"({describe_non_finite(t)}); pass --allow-non-finite to prune it anyway")


def _check_dist_output(cfg: PruneConfig, meta: mio.CheckpointMeta, source: Path, sd: dict) -> None:
    if meta.rank_sizes:
        raise InputError("uneven shards (global-mode pruning) cannot be saved as torch_dist (its tensors do not "
                         "depend on the TP size); prune with --ckpt-format torch, or without global mode")
    if not cfg.allow_non_finite:
        check_finite_state(source, sd)


def _check_job(cfg: PruneConfig, world: int) -> Prepared:
    prep = check(cfg, tp=world)
    if world != prep.meta.tp:
        raise InputError(f"the checkpoint has tp={prep.meta.tp}, but {world} processes run: launch one per TP "
                         f"rank (torchrun --nproc-per-node {prep.meta.tp})")
    return prep


def _finalize(tmp: Path, cfg: PruneConfig, meta: mio.CheckpointMeta, plan: PrunePlan,
              report: SearchReport | None = None) -> None:
    from megatron_prune.checkpoint.atomic import atomic_write_text

    copy_tokenizer_files(Path(cfg.load), tmp)
    plan.save(tmp / PLAN_FILE)
    if report is not None:
        atomic_write_text(tmp / SEARCH_FILE, json.dumps(report.to_json(), indent=1) + "\n")
    mio.write_meta(tmp, meta)
    mio.write_tracker(tmp, "release")


def _attempt(fn, *args) -> str | None:
    try:
        fn(*args)
        return None
    except Exception as e:  # reported to every rank, then raised everywhere
        return f"{type(e).__name__}: {e}"


def write_distributed(cfg: PruneConfig, rank: int, write_rank, finalize) -> None:
    """Atomic multi-process write: temp dir (rank 0) -> every rank's file -> all ok? -> rank 0 finalizes and
    renames. Any failure on any rank removes the temp dir and raises on every rank; nothing is left at --save."""
    save = Path(cfg.save).resolve()
    tmp = save.parent / temp_name(save.name)

    def make_tmp() -> None:
        check_output_dir(save, cfg.overwrite, inputs=cfg.inputs())
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    box = [(str(tmp), _attempt(make_tmp)) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    tmp, error = Path(box[0][0]), box[0][1]
    if error:  # (known to every rank: reported once)
        raise everywhere(CheckpointError(f"cannot create the output directory: {error}"))
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, _attempt(write_rank, tmp))
    status = [next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)]
    if rank == 0:
        status[0] = status[0] or _attempt(_commit, tmp, save, finalize)
        if status[0]:
            shutil.rmtree(tmp, ignore_errors=True)
    dist.broadcast_object_list(status, src=0)
    if status[0]:
        raise everywhere(CheckpointError(f"writing {save} failed ({status[0]})"))


def _commit(tmp: Path, save: Path, finalize) -> None:
    """Rank 0: meta, plan and tracker into the temp dir, then swap it into place."""
    from megatron_prune.checkpoint.atomic import swap_into_place

    finalize(tmp)
    swap_into_place(tmp, save)


class PageDropper:
    """release(tensor) for apply_rank: once a source tensor mmap'd from `path` has been read, drop its resident
    pages (madvise MADV_DONTNEED), so a rank's peak memory is its output plus one input tensor, not the whole
    input shard. Only ranges inside a file-backed private mapping of `path` are touched: there the kernel
    re-reads the file if the pages are used again, so data never changes. A no-op where /proc is unavailable."""

    MADV_DONTNEED = 4

    def __init__(self, path: Path):
        self.ranges: list[tuple[int, int]] = []
        real = os.path.realpath(path)
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].strip() == real:
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        self.ranges.append((lo, hi))
            self._madvise = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            self.ranges = []

    def __call__(self, t: torch.Tensor | None) -> None:
        if t is None or not self.ranges or t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if not any(a <= lo and hi <= b for a, b in self.ranges):
            return
        page = mmap.PAGESIZE
        start, end = -(-lo // page) * page, hi // page * page
        if end > start:
            self._madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), self.MADV_DONTNEED)
