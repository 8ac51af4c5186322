"""Run on every rank by tests/dist/test_prune_dist.py (one torchrun launch for all pruning cases)."""

from __future__ import annotations

from pathlib import Path

import torch


def prune_then_logits(payload: dict) -> dict:
    """Prune every case of payload["prune"] with the distributed driver, then compute the logits of
    payload["logits"] checkpoints with tests.dist.cases.logits. Returns, per case, what this rank saw."""
    from megatron_prune.prune.calib import CalibConfig
    from megatron_prune.prune.config import PruneConfig
    from megatron_prune.prune.run import prune_checkpoint
    from megatron_prune.prune.select import PruneTarget
    from tests.dist.cases import logits

    runs = {}
    for case in payload["prune"]:
        target = None
        if case.get("target") is not None:
            t = dict(case["target"])
            t["drop_layers"] = tuple(t.get("drop_layers", ()))
            target = PruneTarget(**t)
        cfg = PruneConfig(load=case["load"], save=case["save"], target=target, plan=case.get("plan"),
                          importance=case.get("importance", "random"), seed=case.get("seed", 1234),
                          calib=CalibConfig(**case.get("calib", {})), mode=case.get("mode"), progress=False)
        result = prune_checkpoint(cfg)
        shard = torch.load(Path(case["save"]) / "release" / f"mp_rank_{torch.distributed.get_rank():02d}" /
                           "model_optim_rng.pt", weights_only=False)["model"]
        runs[case["name"]] = {"fingerprint": result.plan.fingerprint(), "plan": result.plan.to_json(),
                              "rank_sizes": result.meta.rank_sizes,
                              "shapes": {k: tuple(v.shape) for k, v in shard.items() if v is not None}}
    return {"runs": runs, "logits": logits({"cases": payload["logits"]})}
