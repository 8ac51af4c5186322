"""Functions run on every rank by megatron_prune.testing.run_distributed (one launch, many checks)."""

from __future__ import annotations

import torch


def logits(payload: dict) -> dict:
    """For each case {name, ckpt, tp, pp, tokens}: full-vocab logits and mean loss from the Megatron model.
    Logits come back from the last pipeline stage's TP rank 0 (None elsewhere)."""
    from megatron_prune.model.dist import init_model_parallel
    from megatron_prune.model.forward import forward_batches, mean_loss
    from megatron_prune.model.load import load_model

    out = {}
    for case in payload["cases"]:
        info = init_model_parallel(case["tp"], case["pp"])
        model, meta = load_model(case["ckpt"], info)
        model.eval()
        tokens = torch.tensor(case["tokens"])
        results = forward_batches(model, [tokens], meta.shape.vocab_size, keep_logits=True)
        loss, _ = mean_loss(results)
        first = info.tp_rank == 0 and info.is_last_stage and info.dp_rank == 0
        out[case["name"]] = {"logits": results[0]["logits"] if first else None, "loss": loss}
    return out
