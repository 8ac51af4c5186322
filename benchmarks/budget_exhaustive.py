"""The exhaustive side of benchmarks/budget_search.py: every valid shape of a budget pruned in memory and evaluated on
the held-out text, in one torchrun launch (one process per TP rank).

    every_shape(src, tp, budget, multiple, megatron_only, lower)   # plain loops, independent of prune.search_space
    run_distributed(tp, "benchmarks.budget_exhaustive:evaluate_shapes", payload)

The worker loads the checkpoint once, computes activation importance once on the same calibration windows a
`prune --target-params` run scores with (the first --calib-samples windows of the calibration text), then for each
shape makes the plan (scoring.plan_for's selection, balance mode at the checkpoint's TP), applies it in memory with
the checkpoint writer's slicing (search_run.pruned_model) and measures the mean next-token loss on the held-out
windows, in chunks of `chunk` windows: per-chunk losses are appended to a JSONL file as they come (a killed run
resumes where it stopped), so a short screen (the first chunk) can later be completed to the full text.
The activation scores themselves are saved too (rank 0, torch.save), for the proxy study.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

from megatron_prune.config.shape import LlamaShape, ShapeError, hf_config_warning
from megatron_prune.prune.plan import PlanError
from megatron_prune.prune.select import PruneTarget


def every_shape(src: LlamaShape, tp: int, budget: int, multiple: int, megatron_only: bool, lower: float,
                max_depth_drop: float = 0.5, max_width_drop: float = 0.5) -> list[tuple[int, ...]]:
    """(layers, hidden, heads, groups, ffn) of every shape a user could give by hand within [lower * budget,
    budget]: hidden and FFN multiples of `multiple` (or the source's), heads and layers any count; the same
    validation as hand-given sizes; HF-loadable (hidden % heads == 0) unless `megatron_only`. Plain loops."""
    def widths(n):
        return [v for v in range(1, n + 1) if (v % multiple == 0 or v == n) and n - v <= n * max_width_drop]

    mha = src.num_query_groups == src.num_attention_heads
    counts = [v for v in range(1, src.num_attention_heads + 1) if src.num_attention_heads - v <=
              src.num_attention_heads * max_width_drop] if mha else \
        [src.num_query_groups * k for k in range(1, src.heads_per_group + 1)
         if src.heads_per_group - k <= src.heads_per_group * max_width_drop]
    layers = [n for n in range(1, src.num_layers + 1) if src.num_layers - n <= src.num_layers * max_depth_drop]
    out = []
    for n, hidden, heads, ffn in itertools.product(layers, widths(src.hidden_size), counts,
                                                    widths(src.ffn_hidden_size)):
        groups = heads if mha else src.num_query_groups
        s = src.replace(num_layers=n, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                        ffn_hidden_size=ffn)
        if not lower * budget <= s.num_params() <= budget:
            continue
        if not megatron_only and hf_config_warning(s) is not None:
            continue
        try:
            PruneTarget.of_shape(s).resolve(src, tp).check_parallel(tp)
        except (PlanError, ShapeError):
            continue
        out.append((n, hidden, heads, groups, ffn))
    return out


def _done(path: Path) -> dict[tuple, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(tuple(r["key"]), r["chunk"]): r for r in rows}


def evaluate_shapes(payload: dict) -> dict:
    """On every rank. payload: load, calib (CalibConfig fields), heldout, tokenizer, eval_tokens, seq_length,
    chunk (windows per chunk), chunks (which chunks to evaluate), keys, out (JSONL), scores (file)."""
    import torch
    import torch.distributed as dist

    from megatron_prune.checkpoint import megatron_io as mio
    from megatron_prune.data.text import read_windows
    from megatron_prune.model.evaluate import evaluate_megatron
    from megatron_prune.prune.calib import CalibConfig, read_calibration
    from megatron_prune.prune.scoring import loaded_model, model_shard, score_model
    from megatron_prune.prune.search_run import pruned_model
    from megatron_prune.prune.select import make_plan

    meta = mio.read_meta(payload["load"])
    calib = CalibConfig(**payload["calib"])
    windows = read_calibration(calib, payload["load"], meta.shape.vocab_size, calib.samples).windows
    heldout = read_windows(payload["heldout"], payload["tokenizer"], payload["seq_length"], payload["eval_tokens"])
    out, rank0 = Path(payload["out"]), dist.get_rank() == 0
    done = _done(out)
    chunk = payload["chunk"]
    t0 = time.perf_counter()
    with loaded_model(payload["load"], meta.tp, payload["seq_length"], 1234) as model:
        scores = score_model("activation", model, meta.shape, windows, calib.micro_batch_size)
        if rank0:
            torch.save(scores, payload["scores"])
        t_scores = time.perf_counter() - t0
        sd = model_shard(model)
        for key in map(tuple, payload["keys"]):
            todo = [c for c in payload["chunks"] if (key, c) not in done]
            if not todo:
                continue
            layers, hidden, heads, groups, ffn = key
            target = PruneTarget(hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                                 ffn_hidden_size=ffn, num_layers=layers)
            plan = make_plan(scores, meta.shape, target, meta.tp, "activation")
            pruned = pruned_model(sd, plan, meta, payload["seq_length"])
            for c in todo:
                t1 = time.perf_counter()
                part = heldout[c * chunk:(c + 1) * chunk]
                loss = evaluate_megatron(pruned, part, meta.shape.vocab_size, calib.micro_batch_size).loss
                if rank0:
                    with open(out, "a") as f:
                        f.write(json.dumps({"key": list(key), "chunk": c, "windows": len(part), "loss": loss,
                                            "seconds": time.perf_counter() - t1}) + "\n")
            del pruned
    return {"scores_seconds": t_scores, "total_seconds": time.perf_counter() - t0}
