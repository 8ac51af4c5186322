"""Importance -> plans: the one dispatch over the scoring methods (plan.IMPORTANCES), used by the hand-shape
prune (one target) and by the budget search (one target per candidate shape, all from the same scores).

    with scoring_model(method, load, tp, seq_length, seed) as model:     # None for data-free methods
        plan, = plan_for(method, shape, [target], tp, seed, shard=shard, model=model, calib=calib)

    scores = compute_scores(method, shape, model=model, calib=calib)     # the budget search: score once,
    plans = plans_from_scores(method, scores, shape, targets, tp, seed, calib)   # rank shapes, plan the best

random      seeded draws, the same plan at every TP size (random_plan); nothing loaded.
magnitude   weight norms of this rank's shard (importance.magnitude_scores); no calibration data.
activation  activation norms and Block Influence over calibration windows (importance.ActivationScorer).
taylor      |sum of weight x gradient| of the calibration loss per unit (taylor.taylor_scores).
The last two run the model (MODEL_METHODS): it stays loaded inside `loaded_model`, so that the search can score
and then evaluate candidates without loading it twice.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from megatron_prune.config.shape import LlamaShape
from megatron_prune.model.dist import init_model_parallel
from megatron_prune.model.forward import forward_batches, micro_batches
from megatron_prune.model.load import load_model
from megatron_prune.prune.calib import Calibration
from megatron_prune.prune.importance import ActivationScorer, magnitude_scores
from megatron_prune.prune.plan import IMPORTANCES, PrunePlan
from megatron_prune.prune.random_plan import random_plan
from megatron_prune.prune.select import PruneTarget, Scores, make_plan
from megatron_prune.prune.taylor import taylor_scores

MODEL_METHODS = IMPORTANCES[2:]  # activation, taylor: they run the model on calibration tokens


@contextlib.contextmanager
def loaded_model(load: str | Path, tp: int, seq_length: int, seed: int) -> Iterator[torch.nn.Module]:
    """This rank's GPTModel (eval mode) of checkpoint `load` (TP = world size, PP=1); model parallel state is
    torn down on exit."""
    from megatron.core import parallel_state as ps

    info = init_model_parallel(tp, 1, seed=seed)
    try:
        model, _ = load_model(load, info, seq_length=seq_length)
        model.eval()
        yield model
    finally:
        ps.destroy_model_parallel()


@contextlib.contextmanager
def scoring_model(method: str, load: str | Path, tp: int, seq_length: int, seed: int
                  ) -> Iterator[torch.nn.Module | None]:
    """The loaded model for a method that runs it (loaded_model), else None: nothing is loaded."""
    if method not in MODEL_METHODS:
        yield None
        return
    with loaded_model(load, tp, seq_length, seed) as model:
        yield model


def model_shard(model) -> dict:
    """This rank's parameters by checkpoint key (tensors shared with the model, nothing copied)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def score_model(method: str, model, shape: LlamaShape, windows: torch.Tensor, micro_batch_size: int,
                progress: bool = False) -> Scores:
    """Global Scores (identical on every TP rank) of `method` over calibration `windows` [n, seq + 1]."""
    from megatron.core import parallel_state as ps

    if method not in MODEL_METHODS:
        raise ValueError(f"{method!r} is not a model-based importance method ({', '.join(MODEL_METHODS)})")
    if method == "taylor":
        with warnings.catch_warnings():  # megatron's CUDA tuning hint, printed by every backward on every rank
            warnings.filterwarnings("ignore", message="When using async grad allreduce")
            return taylor_scores(model, shape, windows, micro_batch_size, progress)
    batches = micro_batches(windows, micro_batch_size)
    with ActivationScorer(model, shape) as scorer:
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress, leave=False):
            forward_batches(model, [batch], shape.vocab_size)
    return scorer.scores(ps.get_tensor_model_parallel_group())


def compute_scores(method: str, src: LlamaShape, shard: dict | None = None, model=None,
                   calib: Calibration | None = None, micro_batch_size: int = 4, progress: bool = False
                   ) -> Scores | None:
    """The global Scores of `method` (identical on every TP rank), or None for random (it draws from its seed).
    `shard`: this rank's checkpoint tensors (magnitude; else the loaded `model`'s); `model` + `calib`: activation /
    taylor."""
    if method not in IMPORTANCES:
        raise ValueError(f"{method!r} is not one of {', '.join(IMPORTANCES)}")
    if method == "random":
        return None  # random_plan draws its own, from the seed
    if method == "magnitude":
        if shard is not None:  # a checkpoint shard: one process per TP rank, so the world is the TP group
            return magnitude_scores(shard, src)
        from megatron.core import parallel_state as ps

        return magnitude_scores(model_shard(model), src, ps.get_tensor_model_parallel_group())
    if model is None or calib is None:
        raise ValueError(f"{method} importance needs the loaded model and calibration windows")
    return score_model(method, model, src, calib.windows, micro_batch_size, progress)


def plans_from_scores(method: str, scores: Scores | None, src: LlamaShape, targets: Sequence[PruneTarget], tp: int,
                      seed: int, calib: Calibration | None = None) -> list[PrunePlan]:
    """One plan per target from one scoring (compute_scores); activation / taylor plans record the calibration
    fingerprint."""
    if method == "random":
        return [random_plan(src, target, seed, tp) for target in targets]
    calibration = calib.fingerprint() if method in MODEL_METHODS else None
    return [make_plan(scores, src, target, tp, method, seed=seed, calibration=calibration) for target in targets]


def plan_for(method: str, src: LlamaShape, targets: Sequence[PruneTarget], tp: int, seed: int, *,
             shard: dict | None = None, model=None, calib: Calibration | None = None, micro_batch_size: int = 4,
             progress: bool = False) -> list[PrunePlan]:
    """One plan per target, all from one scoring of the source by `method` (compute_scores, then
    plans_from_scores)."""
    scores = compute_scores(method, src, shard, model, calib, micro_batch_size, progress)
    return plans_from_scores(method, scores, src, targets, tp, seed, calib)
