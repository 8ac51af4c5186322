"""Importance scores that need the model itself (calibration passes), computed on this rank's loaded GPTModel.

    with loaded_model(load, meta, seq_length, seed) as model:   # this TP rank's shard, PP=1
        scores = score_model("activation", model, shape, windows, micro_batch_size)

Data-free methods (random, magnitude) do not load a model: see run.make_plan. The model stays loaded inside the
context so that a caller (the budget search) can score and then evaluate candidates without loading it twice.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from megatron_prune.config.shape import LlamaShape
from megatron_prune.prune.select import Scores

MODEL_METHODS = ("activation", "taylor")  # importance methods that run the model on calibration tokens


@contextlib.contextmanager
def loaded_model(load: str | Path, tp: int, seq_length: int, seed: int) -> Iterator[torch.nn.Module]:
    """This rank's GPTModel (eval mode) of checkpoint `load` (TP = world size, PP=1); model parallel state is
    torn down on exit."""
    from megatron.core import parallel_state as ps

    from megatron_prune.model.dist import init_model_parallel
    from megatron_prune.model.load import load_model

    info = init_model_parallel(tp, 1, seed=seed)
    try:
        model, _ = load_model(load, info, seq_length=seq_length)
        model.eval()
        yield model
    finally:
        ps.destroy_model_parallel()


def micro_batches(windows: torch.Tensor, micro_batch_size: int) -> list[torch.Tensor]:
    return [windows[i:i + micro_batch_size] for i in range(0, len(windows), micro_batch_size)]


def score_model(method: str, model, shape: LlamaShape, windows: torch.Tensor, micro_batch_size: int,
                progress: bool = False) -> Scores:
    """Global Scores (identical on every TP rank) of `method` over calibration `windows` [n, seq + 1]."""
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from megatron_prune.model.forward import forward_batches
    from megatron_prune.prune.importance import ActivationScorer

    if method not in MODEL_METHODS:
        raise ValueError(f"{method!r} is not a model-based importance method ({', '.join(MODEL_METHODS)})")
    if method == "taylor":
        import warnings

        from megatron_prune.prune.taylor import taylor_scores

        with warnings.catch_warnings():  # megatron's CUDA tuning hint, printed by every backward on every rank
            warnings.filterwarnings("ignore", message="When using async grad allreduce")
            return taylor_scores(model, shape, windows, micro_batch_size, progress)
    batches = micro_batches(windows, micro_batch_size)
    with ActivationScorer(model, shape) as scorer:
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress, leave=False):
            forward_batches(model, [batch], shape.vocab_size)
    return scorer.scores(ps.get_tensor_model_parallel_group())
