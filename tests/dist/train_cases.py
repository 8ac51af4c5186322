"""Training cases run on every rank by megatron_prune.testing.run_distributed (one launch, many runs).

Each case is {"name", "kind", "cfg": TrainConfig fields, ...}; results come back keyed by name, identical on
every rank (losses are reduced over the world inside the trainer).
"""

from __future__ import annotations

import inspect
import io
import time
from typing import Any

import torch


def _patch_sequence_parallel_build() -> None:
    """Until model.build.layer_spec passes the TransformerConfig to sp_norm.sequence_parallel_local_spec (the
    decoder's final norm comes from the block spec), hand it the config here. No-op once build.py does so."""
    from megatron_prune.model import build, sp_norm

    if len(inspect.signature(build.layer_spec).parameters) > 1 or getattr(build, "_sp_patched", False):
        return
    original = build.build_model

    def build_model(shape, opts, pre_process=None, post_process=None):
        if not (opts.sequence_parallel and opts.tp > 1):
            return original(shape, opts, pre_process, post_process)
        config, spec_fn = build.transformer_config(shape, opts), build.layer_spec
        build.layer_spec = lambda _opts: sp_norm.sequence_parallel_local_spec(config)
        try:
            return original(shape, opts, pre_process, post_process)
        finally:
            build.layer_spec = spec_fn

    build.build_model = build_model
    build._sp_patched = True


def _history(result) -> list[dict]:
    return [{k: h[k] for k in ("iteration", "lm_loss", "kd_loss", "grad_norm", "lr", "skipped")}
            for h in result.history]


def _train(case: dict) -> dict:
    from megatron_prune.model.evaluate import evaluate_megatron
    from megatron_prune.train.config import TrainConfig
    from megatron_prune.train.loop import run, setup

    stream = io.StringIO()
    session = setup(TrainConfig(**case["cfg"]))
    result = run(session, stream)
    out: dict[str, Any] = {"history": _history(result), "evals": result.evals, "saved": result.saved,
                           "log": stream.getvalue()}
    if case.get("heldout"):
        windows = torch.tensor(case["heldout"])
        out["heldout_loss"] = evaluate_megatron(session.model.module, windows, session.true_vocab).loss
    return out


def _guard(case: dict) -> dict:
    """NaN losses injected in chosen iterations: the step is skipped and reported; K in a row abort."""
    from megatron_prune.model import forward
    from megatron_prune.train.config import TrainConfig
    from megatron_prune.train.loop import TrainingAborted, run, setup

    session = setup(TrainConfig(**case["cfg"]))
    bad = set(case["nan_iterations"])
    original = forward.token_losses

    def poisoned(logits, labels, true_vocab):
        losses = original(logits, labels, true_vocab)
        return losses * float("nan") if session.progress.iteration + 1 in bad else losses

    forward.token_losses = poisoned
    stream, error, result = io.StringIO(), None, None
    try:
        result = run(session, stream)
    except TrainingAborted as e:
        error = str(e)
    finally:
        forward.token_losses = original
    return {"error": error, "log": stream.getvalue(), "iteration": session.progress.iteration,
            "history": _history(result) if result else None}


def _kd_function(case: dict) -> dict:
    """kd_token_losses on this TP rank's slice of given full-vocabulary logits; loss and local gradient."""
    from megatron.core import parallel_state as ps

    from megatron_prune.model.dist import init_model_parallel
    from megatron_prune.train.distill import kd_token_losses

    info = init_model_parallel(case["tp"], 1)
    student, teacher = torch.tensor(case["student"]), torch.tensor(case["teacher"])
    upstream = torch.tensor(case["upstream"])
    v_local = student.shape[-1] // info.tp
    sl = slice(info.tp_rank * v_local, (info.tp_rank + 1) * v_local)
    s_local = student[..., sl].clone().requires_grad_(True)
    t_local = teacher[..., sl].clone().requires_grad_(True)
    loss = kd_token_losses(s_local, t_local, case["true_vocab"], case["temperature"])
    (loss * upstream).sum().backward()
    return {"loss": loss.detach(), "grad": s_local.grad, "tp_rank": ps.get_tensor_model_parallel_rank(),
            "teacher_grad": t_local.grad}


KINDS = {"train": _train, "guard": _guard, "kd_function": _kd_function}


def main(payload: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    _patch_sequence_parallel_build()
    out = {}
    for case in payload["cases"]:
        start = time.perf_counter()
        out[case["name"]] = KINDS[case.get("kind", "train")](case)
        out[case["name"]]["seconds"] = time.perf_counter() - start
    return out
