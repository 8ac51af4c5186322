"""Run on every rank by tests/dist/test_prune_search.py (one torchrun launch): budget searches through the
distributed driver, then the written checkpoints evaluated the way `python -m megatron_prune eval` does."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


def search_then_evaluate(payload: dict) -> dict:
    from megatron_prune.prune.calib import CalibConfig
    from megatron_prune.prune.config import PruneConfig, SearchConfig
    from megatron_prune.prune.run import prune_checkpoint
    from megatron_prune.prune.search_space import SearchLimits

    out = {}
    for case in payload["cases"]:
        search = SearchConfig(target_params=case["budget"], limits=SearchLimits(**case["limits"]),
                              eval_samples=case["eval_samples"], kd_iters=case.get("kd_iters", 0))
        cfg = PruneConfig(load=case["load"], save=case["save"], importance=case["importance"],
                          calib=CalibConfig(**case["calib"]), progress=False, search=search)
        result = prune_checkpoint(cfg)
        windows = held_out_windows(case)
        loser = None
        if case.get("check_loser"):  # a losing candidate, pruned by hand to its sizes and written like any prune
            loser = losing_candidate(case, result.search, windows)
        out[case["name"]] = {"loser": loser, "report": json.loads((Path(case["save"]) / "prune_search.json").read_text()),
                             "in_memory": result.search.to_json(), "written_loss": written_loss(case["save"],
                                                                                                windows),
                             "held_out_sha256": hashlib.sha256(windows.numpy().astype("int64").tobytes()).hexdigest(),
                             "windows": windows}
    return out


def losing_candidate(case: dict, report, windows: torch.Tensor) -> dict:
    from megatron_prune.prune.calib import CalibConfig
    from megatron_prune.prune.config import PruneConfig
    from megatron_prune.prune.run import prune_checkpoint
    from megatron_prune.prune.select import PruneTarget

    i = max(range(len(report.losses)), key=lambda k: report.losses[k])  # the worst: surely not chosen
    s = report.candidates[i].shape
    target = PruneTarget(hidden_size=s.hidden_size, num_attention_heads=s.num_attention_heads,
                         num_query_groups=s.num_query_groups, ffn_hidden_size=s.ffn_hidden_size,
                         num_layers=s.num_layers)
    save = case["save"] + "-loser"
    prune_checkpoint(PruneConfig(load=case["load"], save=save, target=target, importance=case["importance"],
                                 calib=CalibConfig(**case["calib"]), progress=False))
    return {"index": i, "written_loss": written_loss(save, windows)}


def held_out_windows(case: dict) -> torch.Tensor:
    """The last `eval_samples` windows of the calibration text, read as the eval command reads text."""
    from megatron_prune.data.text import read_windows

    c = case["calib"]
    want = (c["samples"] + case["eval_samples"]) * c["seq_length"]
    windows = read_windows(c["data"], c["tokenizer"], c["seq_length"], want)
    return windows[len(windows) - case["eval_samples"]:]


def written_loss(ckpt: str, windows: torch.Tensor) -> float:
    """Mean held-out loss of a written checkpoint: load it from disk as `eval` does, fresh model parallel state."""
    from megatron.core import parallel_state as ps

    from megatron_prune.checkpoint import megatron_io as mio
    from megatron_prune.model.dist import init_model_parallel
    from megatron_prune.model.evaluate import evaluate_megatron
    from megatron_prune.model.load import load_model

    meta = mio.read_meta(ckpt)
    info = init_model_parallel(meta.tp, meta.pp)
    try:
        model, meta = load_model(ckpt, info)
        return evaluate_megatron(model, windows, meta.shape.vocab_size).loss
    finally:
        ps.destroy_model_parallel()
