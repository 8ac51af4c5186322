"""Run on every rank by tests/dist/test_taylor_dist.py (one torchrun launch for all Taylor checks)."""

from __future__ import annotations

import torch


def taylor(payload: dict) -> dict:
    """Taylor scores of each case's checkpoint (TP = world) through prune.scoring, plus what must hold after:
    no gradient left on the model, no autograd graph kept by the Block Influence hooks."""
    from megatron_prune.checkpoint import megatron_io as mio
    from megatron_prune.prune import importance
    from megatron_prune.prune.scoring import loaded_model, score_model

    scorers = []
    real_init = importance.ActivationScorer.__init__

    def spy(self, *args, **kwargs):  # keep the scorer taylor_scores makes, to inspect its accumulators
        real_init(self, *args, **kwargs)
        scorers.append(self)

    importance.ActivationScorer.__init__ = spy
    out = {}
    try:
        for case in payload["cases"]:
            meta = mio.read_meta(case["load"])
            windows = torch.tensor(case["windows"])
            with loaded_model(case["load"], meta.tp, windows.shape[1] - 1, seed=1) as model:
                for p in model.parameters():  # e.g. a caller's frozen model: must still be scored, left frozen
                    p.requires_grad_(not case.get("frozen", False))
                scores = score_model("taylor", model, meta.shape, windows, case["micro_batch_size"])
                grads_left = [n for n, p in model.named_parameters() if p.grad is not None]
                frozen_after = [n for n, p in model.named_parameters() if not p.requires_grad]
            kept = [t for t in (*scorers[-1].hidden_sq, *scorers[-1].heads_sq, *scorers[-1].ffn_sq,
                                scorers[-1].bi_sum) if isinstance(t, torch.Tensor)]
            out[case["name"]] = {"scores": scores.__dict__, "grads_left": grads_left,
                                 "graph_kept": any(t.requires_grad for t in kept), "frozen_after": frozen_after,
                                 "params": [n for n, _ in model.named_parameters()]}
    finally:
        importance.ActivationScorer.__init__ = real_init
    return out
