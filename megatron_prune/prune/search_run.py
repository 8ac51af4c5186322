"""Pruning to a budget, on every TP rank: score once, try the top candidate shapes in memory, keep the best.

    space = find_candidates(meta.shape, meta.tp, load, cfg.search)       # in check(), one process is enough
    scoring, held_out = search_windows(cfg, vocab)                        # in check() too
    plan, report = search_plan(cfg, meta, space, scoring, held_out)      # on every rank

1. The calibration windows are split: the first `--calib-samples` give the importance scores (one calibration
   pass for activation / Taylor; weights for magnitude; a seed for random), the last `--search-eval-samples` are
   held apart and only ever used to compare candidates.
2. The space's maximal shapes (search_space.find_space) are ranked by the importance proxy, computed from the
   same scores (search_proxy.pick: a damage estimate from the share of each axis' importance a shape keeps); the
   best `--search-candidates` are evaluated (random importance has no scores: the closest to the budget). For each,
   the plan is made from the scores (scoring.plans_from_scores) and applied in memory to this rank's shard of the
   loaded model
   (prune.apply.apply_rank, the very function that writes pruned checkpoints), loaded into a pruned GPTModel and
   evaluated on the held-out windows: mean next-token loss, exactly what `python -m megatron_prune eval` reports
   for the written checkpoint. No files.
   With `--search-kd-iters N` the pruned model first distils N steps from the unpruned model (already in memory).
3. The lowest loss wins. Losses are reduced over the TP group inside the evaluation, so every rank sees the same
   numbers; the choice is still compared across ranks before anything is written.
Peak memory per rank: the loaded model plus one pruned candidate (model and its shard) at a time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.config.shape import GiB, LlamaShape
from megatron_prune.errors import InputError
from megatron_prune.model.agree import check_identical
from megatron_prune.model.build import build_model, load_shard
from megatron_prune.model.evaluate import evaluate_megatron
from megatron_prune.model.forward import micro_batches, model_inputs
from megatron_prune.model.load import model_options
from megatron_prune.prune.apply import apply_rank, target_shape
from megatron_prune.prune.budget import Budget, BudgetError, make_budget
from megatron_prune.prune.calib import Calibration, read_calibration
from megatron_prune.prune.config import PruneConfig, SearchConfig
from megatron_prune.prune.display import align_table
from megatron_prune.prune.plan import PlanError, PrunePlan
from megatron_prune.prune.scoring import compute_scores, loaded_model, model_shard, plans_from_scores
from megatron_prune.prune.search_proxy import Selection, pick
from megatron_prune.prune.search_space import Candidate, Space, find_space
from megatron_prune.prune.select import PruneTarget
from megatron_prune.train.distill import kd_token_losses

SEARCH_FILE = "prune_search.json"


@dataclass(frozen=True)
class SearchReport:
    space: Space
    selection: Selection
    losses: tuple[float, ...]          # what ranks them: held-out loss (after the distillation steps, if any)
    chosen: int
    method: str
    held_out: dict           # fingerprint of the held-out windows
    kd_iters: int
    seconds: dict
    pruned_losses: tuple[float, ...] = ()  # with distillation steps: the loss right after pruning, before them

    @property
    def budget(self) -> Budget:
        return self.space.budget

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        return self.selection.candidates

    def to_json(self) -> dict:
        cands = [{"shape": c.shape.to_dict(), "params": c.params, "hf_loadable": c.hf_loadable,
                  "proxy_damage": damage, "score": _finite(loss)}
                 for c, damage, loss in zip(self.candidates, self.selection.damage, self.losses)]
        if self.budget.memory is not None:
            for c, cand in zip(cands, self.candidates):
                c["memory_bytes"] = cand.memory
        for c, loss in zip(cands, self.pruned_losses):
            c["loss_after_pruning"] = _finite(loss)
        return {"budget": self.budget.to_json(), "space": self.space.to_json(), "selection": self.selection.to_json(),
                "method": self.method, "held_out": self.held_out, "kd_iters": self.kd_iters,
                "seconds": self.seconds, "chosen": self.chosen, "candidates": cands}

    def header(self) -> str:
        """What was searched and how the evaluated shapes were picked: two lines above the table."""
        what = f"{self.held_out['tokens']} held-out tokens after pruning"
        what += f" and {self.kd_iters} distillation steps" if self.kd_iters else ""
        return (f"budget {self.budget.describe()}: {self.space.describe()}\n"
                f"evaluated: {self.selection.how}; loss on {what}")

    def table(self) -> str:
        mem, mixed = self.budget.memory is not None, self.space.limits.megatron_only_shapes
        proxy = any(p is not None for p in self.selection.damage)
        rows = [("rank", "shape", "params") + (("memory GiB",) if mem else ()) + (("damage",) if proxy else ())
                + (("HF",) if mixed else ()) + ("loss", "chosen")]
        for i, (c, p, loss) in enumerate(zip(self.candidates, self.selection.damage, self.losses), 1):
            rows.append((str(i), c.line(), f"{c.params:,}") + ((f"{c.memory / GiB:.4f}",) if mem else ())
                        + ((f"{p:.4f}",) if proxy else ()) + (("yes" if c.hf_loadable else "no",) if mixed else ())
                        + (f"{loss:.4f}", "*" if i - 1 == self.chosen else ""))
        return align_table(rows)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN


# ----------------------------------------------------------------------------- checks (before any work)
def limits_reference(path: str | Path) -> LlamaShape:
    """The sizes of an HF model directory or a Megatron checkpoint (`--limits-of`: what the drop limits are
    measured from)."""
    from megatron_prune.config.shape import read_hf_config

    p = Path(path)
    if (p / "config.json").is_file() and not (p / mio.TRACKER).is_file():
        try:
            return LlamaShape.from_hf_config(read_hf_config(p))
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"--limits-of {path}: not a LLaMA config ({e})") from None
    if not p.is_dir():
        raise InputError(f"--limits-of {path}: no such directory (an HF model or a Megatron checkpoint)")
    return mio.read_meta(p).shape


def find_candidates(src: LlamaShape, tp: int, load: str | Path, search_cfg: SearchConfig) -> Space:
    """The budget of the flags and its search space (no tensors read)."""
    s = search_cfg
    budget = make_budget(src, s.target_params, s.target_memory_gb, s.memory_seq_length, s.memory_batch_size)
    try:
        return find_space(src, tp, budget, s.limits)
    except BudgetError as e:
        raise BudgetError(f"{load}: {e}") from None


def check_search_importance(importance: str, src: LlamaShape, candidates: tuple[Candidate, ...]) -> None:
    deeper = [c for c in candidates if c.shape.num_layers < src.num_layers]
    if importance == "magnitude" and deeper:
        raise PlanError(f"{len(deeper)} of the {len(candidates)} candidate shapes drop layers (e.g. "
                        f"{deeper[0].line()}), which needs layer scores: use --importance activation or taylor, or "
                        f"--max-depth-drop 0 with magnitude")


def split_windows(windows: torch.Tensor, scoring: int, held_out: int, source: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scoring windows, held-out windows): disjoint, the held-out ones taken from the end."""
    if len(windows) < held_out + 1:
        raise InputError(f"{source}: {len(windows)} calibration windows, the search needs at least "
                         f"{held_out + 1} ({held_out} held out for --search-eval-samples + 1 for scoring): give "
                         f"more --calib-data or fewer --search-eval-samples")
    return windows[:min(scoring, len(windows) - held_out)], windows[len(windows) - held_out:]


def search_windows(cfg: PruneConfig, vocab: int) -> tuple[Calibration, Calibration]:
    """(scoring, held-out) calibration windows of a budget search, whatever the importance method."""
    c, held = cfg.calib, cfg.search.eval_samples
    calib = read_calibration(c, cfg.load, vocab, c.samples + held)
    scoring, held_out = split_windows(calib.windows, c.samples, held, calib.where["source"])
    return Calibration(scoring, calib.where, calib.seconds), Calibration(held_out, calib.where)


# ----------------------------------------------------------------------------- candidates in memory
def pruned_model(model_sd: dict, plan: PrunePlan, meta: mio.CheckpointMeta, seq_length: int):
    """The pruned GPTModel of this rank, built and loaded in memory (apply_rank: the checkpoint writer's slicing)."""
    from megatron.core import parallel_state as ps

    rank = ps.get_tensor_model_parallel_rank()
    sd = apply_rank(model_sd, plan, meta.tp, rank)
    model = build_model(target_shape(plan, meta.shape), model_options(meta, seq_length=seq_length))
    load_shard(model, sd)
    del sd
    return model


def distill(student, teacher, windows: torch.Tensor, iters: int, lr: float, micro_batch_size: int, vocab: int
            ) -> None:
    """`iters` AdamW steps of KL(teacher || student) on the scoring windows (cycled), TP-aware."""
    batches = micro_batches(windows, micro_batch_size)
    device = next(student.parameters()).device
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    student.train()
    for it in range(iters):
        tokens, _, pos, mask = model_inputs(batches[it % len(batches)], device)
        with torch.no_grad():
            target = teacher(tokens, pos, mask)
        loss = kd_token_losses(student(tokens, pos, mask), target, vocab).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    student.eval()
    del opt


def evaluate_candidates(model, meta: mio.CheckpointMeta, plans: list[PrunePlan], held_out: torch.Tensor,
                        scoring: torch.Tensor, cfg: PruneConfig, progress: bool
                        ) -> tuple[list[float], list[float], list[dict]]:
    """(held-out loss, loss before the distillation steps (if any), seconds) of every plan, one pruned model in
    memory at a time; seconds = {"build": slice + load, "evaluate": (distil +) held-out passes}."""
    c, s = cfg.calib, cfg.search

    def loss(m) -> float:
        return evaluate_megatron(m, held_out, meta.shape.vocab_size, c.micro_batch_size).loss

    model_sd, losses, before, seconds = model_shard(model), [], [], []
    for plan in tqdm(plans, desc="candidates", unit="shape", disable=not progress, leave=False):
        t0 = time.perf_counter()
        pruned = pruned_model(model_sd, plan, meta, c.seq_length)
        t1 = time.perf_counter()
        if s.kd_iters:
            before.append(loss(pruned))
            distill(pruned, model, scoring, s.kd_iters, s.kd_lr, c.micro_batch_size, meta.shape.vocab_size)
        losses.append(loss(pruned))
        del pruned
        seconds.append({"build": t1 - t0, "evaluate": time.perf_counter() - t1})
    return losses, before, seconds


def search_plan(cfg: PruneConfig, meta: mio.CheckpointMeta, space: Space, scoring: Calibration,
                held_out: Calibration) -> tuple[PrunePlan, SearchReport]:
    """The best candidate's plan and the report, the same on every rank."""
    t0 = time.perf_counter() - scoring.seconds  # the windows were read in the check: their time counts here
    progress = cfg.progress and dist.get_rank() == 0
    with loaded_model(cfg.load, meta.tp, cfg.calib.seq_length, cfg.seed) as model:
        scores = compute_scores(cfg.importance, meta.shape, model=model, calib=scoring,
                                micro_batch_size=cfg.calib.micro_batch_size, progress=progress)
        t_scores = time.perf_counter() - t0
        selection = pick(space, scores, meta.shape, meta.tp)  # identical scores on every rank: the same pick
        targets = [PruneTarget.of_shape(c.shape) for c in selection.candidates]
        plans = plans_from_scores(cfg.importance, scores, meta.shape, targets, meta.tp, cfg.seed, scoring)
        t_pick = time.perf_counter() - t0 - t_scores
        losses, before, per_candidate = evaluate_candidates(model, meta, plans, held_out.windows, scoring.windows,
                                                            cfg, progress)
    chosen = choose(losses, selection.candidates)
    check_identical(json.dumps([chosen, losses]), "candidate choices")  # the losses are TP-reduced: they agree
    seconds = {"scores": t_scores, "proxy": t_pick, "candidates": per_candidate, "total": time.perf_counter() - t0}
    report = SearchReport(space=space, selection=selection, losses=tuple(losses), chosen=chosen,
                          method=cfg.importance, held_out=held_out.fingerprint(), kd_iters=cfg.search.kd_iters,
                          seconds=seconds, pruned_losses=tuple(before))
    return plans[chosen], report


def choose(losses: list[float], candidates: list[Candidate]) -> int:
    """The lowest finite loss (ties: the earlier, i.e. closer to the budget); NaN / Inf never win."""
    finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
    if not finite:
        raise InputError(f"every candidate's held-out loss is non-finite ({candidates[0].line()}: {losses[0]}): "
                         f"check the checkpoint for NaN / Inf weights and the calibration data")
    return min(finite, key=lambda i: (losses[i], i))
