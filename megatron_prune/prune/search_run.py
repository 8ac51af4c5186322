"""Pruning to a budget, on every TP rank: score once, try the top candidate shapes in memory, keep the best.

    plan, report = search_plan(cfg, meta, candidates)

1. The calibration windows are split: the first `--calib-samples` give the importance scores (one calibration
   pass for activation / Taylor; weights for magnitude; a seed for random), the last `--search-eval-samples` are
   held apart and only ever used to compare candidates.
2. For each candidate shape (search_space.search: the shapes closest to the budget), the plan is made from the
   same scores and applied in memory to this rank's shard of the loaded model (prune.apply.apply_rank, the very
   function that writes pruned checkpoints), loaded into a pruned GPTModel and evaluated on the held-out windows:
   mean next-token loss, exactly what `python -m megatron_prune eval` reports for the written checkpoint. No files.
   With `--search-kd-iters N` the pruned model first distils N steps from the unpruned model (already in memory).
3. The lowest loss wins. Losses are reduced over the TP group inside the evaluation, so every rank sees the same
   numbers; the choice is still compared across ranks before anything is written.
Peak memory per rank: the loaded model plus one pruned candidate (model and its shard) at a time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_prune.errors import InputError
from megatron_prune.prune.plan import PrunePlan
from megatron_prune.prune.search_space import Budget, Candidate, SearchLimits, align_table
from megatron_prune.prune.select import PruneTarget, Scores

SEARCH_FILE = "prune_search.json"


@dataclass(frozen=True)
class SearchConfig:
    target_params: str | None            # a count or a percentage (search_space.make_budget), and/or
    target_memory_gb: str | None = None  # GiB of bf16 weights + KV cache of memory_batch_size x memory_seq_length
    memory_seq_length: int | None = None  # None: the model's max_position_embeddings
    memory_batch_size: int = 1
    limits: SearchLimits = field(default_factory=SearchLimits)
    eval_samples: int = 16   # held-out calibration windows that rank the candidates
    kd_iters: int = 0        # distillation steps per candidate before it is evaluated
    kd_lr: float = 1e-4

    def __post_init__(self) -> None:
        if self.eval_samples < 1:
            raise InputError(f"--search-eval-samples must be >= 1, got {self.eval_samples}")
        if self.kd_iters < 0:
            raise InputError(f"--search-kd-iters must be >= 0, got {self.kd_iters}")
        if not self.kd_lr > 0:
            raise InputError(f"--search-kd-lr must be > 0, got {self.kd_lr}")


@dataclass(frozen=True)
class SearchReport:
    budget: Budget
    candidates: tuple[Candidate, ...]
    losses: tuple[float, ...]          # what ranks them: held-out loss (after the distillation steps, if any)
    chosen: int
    method: str
    held_out: dict           # fingerprint of the held-out windows
    kd_iters: int
    seconds: dict
    pruned_losses: tuple[float, ...] = ()  # with distillation steps: the loss right after pruning, before them

    def to_json(self) -> dict:
        cands = [{"shape": c.shape.to_dict(), "params": c.params, "score": _finite(loss)}
                 for c, loss in zip(self.candidates, self.losses)]
        if self.budget.memory is not None:
            for c, cand in zip(cands, self.candidates):
                c["memory_bytes"] = cand.memory
        for c, loss in zip(cands, self.pruned_losses):
            c["loss_after_pruning"] = _finite(loss)
        return {"budget": self.budget.to_json(), "method": self.method, "held_out": self.held_out, "kd_iters": self.kd_iters,
                "seconds": self.seconds, "chosen": self.chosen, "candidates": cands}

    def table(self) -> str:
        mem = self.budget.memory is not None
        rows = [("rank", "shape", "params") + (("memory GiB",) if mem else ()) + ("loss", "chosen")]
        rows += [(str(i), c.line(), f"{c.params:,}") + ((f"{c.memory / 2**30:.4f}",) if mem else ())
                 + (f"{loss:.4f}", "*" if i - 1 == self.chosen else "")
                 for i, (c, loss) in enumerate(zip(self.candidates, self.losses), 1)]
        return align_table(rows)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN


def split_windows(windows: torch.Tensor, scoring: int, held_out: int, source: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scoring windows, held-out windows): disjoint, the held-out ones taken from the end."""
    if len(windows) < held_out + 1:
        raise InputError(f"{source}: {len(windows)} calibration windows, the search needs at least "
                         f"{held_out + 1} ({held_out} held out for --search-eval-samples + 1 for scoring): give "
                         f"more --calib-data or fewer --search-eval-samples")
    return windows[:min(scoring, len(windows) - held_out)], windows[len(windows) - held_out:]


def candidate_spec(c: Candidate) -> PruneTarget:
    return PruneTarget.of_shape(c.shape)


def candidate_plan(method: str, scores: Scores | None, src, tp: int, c: Candidate, seed: int,
                   calibration: dict | None) -> PrunePlan:
    from megatron_prune.prune.random_plan import random_plan
    from megatron_prune.prune.select import make_plan

    if method == "random":
        return random_plan(src, candidate_spec(c), seed, tp)
    return make_plan(scores, src, candidate_spec(c), tp, method, seed=seed, calibration=calibration)


def model_shard(model) -> dict:
    """This rank's parameters by checkpoint key (tensors shared with the model, nothing copied)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def pruned_model(model_sd: dict, plan: PrunePlan, meta, seq_length: int):
    """The pruned GPTModel of this rank, built and loaded in memory (apply_rank: the checkpoint writer's slicing)."""
    from megatron.core import parallel_state as ps

    from megatron_prune.model.build import build_model, load_shard
    from megatron_prune.model.load import model_options
    from megatron_prune.prune.apply import apply_rank, target_shape

    rank = ps.get_tensor_model_parallel_rank()
    sd = apply_rank(model_sd, plan, meta.tp, rank)
    model = build_model(target_shape(plan, meta.shape), model_options(meta, seq_length=seq_length))
    load_shard(model, sd)
    del sd
    return model


def distill(student, teacher, windows: torch.Tensor, iters: int, lr: float, micro_batch_size: int, vocab: int
            ) -> None:
    """`iters` AdamW steps of KL(teacher || student) on the scoring windows (cycled), TP-aware."""
    from megatron_prune.model.forward import causal_mask
    from megatron_prune.prune.scoring import micro_batches
    from megatron_prune.train.distill import kd_token_losses

    batches = micro_batches(windows, micro_batch_size)
    device = next(student.parameters()).device
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    student.train()
    for it in range(iters):
        tokens = batches[it % len(batches)][:, :-1].contiguous().to(device)
        pos = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        mask = causal_mask(tokens.shape[1], device)
        with torch.no_grad():
            target = teacher(tokens, pos, mask)
        loss = kd_token_losses(student(tokens, pos, mask), target, vocab).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    student.eval()
    del opt


def evaluate_candidates(model, meta, plans: list[PrunePlan], held_out: torch.Tensor, scoring: torch.Tensor,
                        cfg, progress: bool) -> tuple[list[float], list[float], list[dict]]:
    """(held-out loss, loss before the distillation steps (if any), seconds) of every plan, one pruned model in
    memory at a time; seconds = {"build": slice + load, "evaluate": (distil +) held-out passes}."""
    from tqdm import tqdm

    from megatron_prune.model.evaluate import evaluate_megatron

    def loss(m) -> float:
        return evaluate_megatron(m, held_out, meta.shape.vocab_size, cfg.calib.micro_batch_size).loss

    model_sd, losses, before, seconds = model_shard(model), [], [], []
    for plan in tqdm(plans, desc="candidates", unit="shape", disable=not progress, leave=False):
        t0 = time.perf_counter()
        pruned = pruned_model(model_sd, plan, meta, cfg.calib.seq_length)
        t1 = time.perf_counter()
        if cfg.search.kd_iters:
            before.append(loss(pruned))
            distill(pruned, model, scoring, cfg.search.kd_iters, cfg.search.kd_lr, cfg.calib.micro_batch_size,
                    meta.shape.vocab_size)
        losses.append(loss(pruned))
        del pruned
        seconds.append({"build": t1 - t0, "evaluate": time.perf_counter() - t1})
    return losses, before, seconds


def search_plan(cfg, meta, candidates: list[Candidate], budget: Budget) -> tuple[PrunePlan, SearchReport]:
    """The best candidate's plan and the report, the same on every rank (cfg: run.PruneConfig with .search)."""
    from megatron_prune.prune.importance import magnitude_scores
    from megatron_prune.prune.run import calibration_windows, windows_fingerprint
    from megatron_prune.prune.scoring import MODEL_METHODS, loaded_model, score_model

    t0 = time.perf_counter()
    progress = cfg.progress and dist.get_rank() == 0
    windows, where = calibration_windows(cfg, meta.shape.vocab_size, cfg.calib.samples + cfg.search.eval_samples)
    scoring, held_out = split_windows(windows, cfg.calib.samples, cfg.search.eval_samples, where["source"])
    calibration = windows_fingerprint(scoring, where) if cfg.importance in MODEL_METHODS else None
    with loaded_model(cfg.load, meta.tp, cfg.calib.seq_length, cfg.seed) as model:
        scores = None
        if cfg.importance in MODEL_METHODS:
            scores = score_model(cfg.importance, model, meta.shape, scoring, cfg.calib.micro_batch_size, progress)
        elif cfg.importance == "magnitude":
            from megatron.core import parallel_state as ps

            scores = magnitude_scores(model_shard(model), meta.shape, ps.get_tensor_model_parallel_group())
        t_scores = time.perf_counter() - t0
        plans = [candidate_plan(cfg.importance, scores, meta.shape, meta.tp, c, cfg.seed, calibration)
                 for c in candidates]
        losses, before, per_candidate = evaluate_candidates(model, meta, plans, held_out, scoring, cfg, progress)
    chosen = choose(losses, candidates)
    check_same_choice(chosen, losses)
    seconds = {"scores": t_scores, "candidates": per_candidate, "total": time.perf_counter() - t0}
    report = SearchReport(budget=budget, candidates=tuple(candidates), losses=tuple(losses), chosen=chosen,
                          method=cfg.importance, held_out=windows_fingerprint(held_out, where),
                          kd_iters=cfg.search.kd_iters, seconds=seconds, pruned_losses=tuple(before))
    return plans[chosen], report


def choose(losses: list[float], candidates: list[Candidate]) -> int:
    """The lowest finite loss (ties: the earlier, i.e. closer to the budget); NaN / Inf never win."""
    finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
    if not finite:
        raise InputError(f"every candidate's held-out loss is non-finite ({candidates[0].line()}: {losses[0]}): "
                         f"check the checkpoint for NaN / Inf weights and the calibration data")
    return min(finite, key=lambda i: (losses[i], i))


def check_same_choice(chosen: int, losses: list[float]) -> None:
    """Every rank must pick the same candidate (the losses are TP-reduced, so they should agree exactly)."""
    from megatron_prune.model.agree import check_identical

    check_identical(json.dumps([chosen, losses]), "candidate choices")
