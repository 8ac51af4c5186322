"""Run on every rank by tests/dist/test_search_toy.py (one torchrun launch): for each width multiple, the budget
search's pick (search_run.search_plan, in memory) and, by brute force, the held-out loss of every valid shape the
test enumerated, each pruned from the same scores and evaluated on the same held-out windows."""

from __future__ import annotations


def search_and_brute_force(payload: dict) -> dict:
    from megatron_prune.checkpoint import megatron_io as mio
    from megatron_prune.model.evaluate import evaluate_megatron
    from megatron_prune.prune.calib import CalibConfig
    from megatron_prune.prune.config import PruneConfig, SearchConfig
    from megatron_prune.prune.scoring import compute_scores, loaded_model, model_shard
    from megatron_prune.prune.search_run import find_candidates, pruned_model, search_plan, search_windows
    from megatron_prune.prune.search_space import SearchLimits
    from megatron_prune.prune.select import PruneTarget, make_plan

    meta = mio.read_meta(payload["load"])
    calib = CalibConfig(**payload["calib"])
    reports = {}
    for multiple in payload["cases"]:
        limits = SearchLimits(int(multiple), candidates=payload["candidates"])
        search = SearchConfig(target_params=payload["budget"], limits=limits, eval_samples=payload["eval_samples"])
        cfg = PruneConfig(load=payload["load"], save=payload["load"] + "-unused", importance="activation",
                          calib=calib, progress=False, search=search)
        space = find_candidates(meta.shape, meta.tp, cfg.load, search)
        scoring, held_out = search_windows(cfg, meta.shape.vocab_size)
        reports[multiple] = search_plan(cfg, meta, space, scoring, held_out)[1].to_json()
    losses = {multiple: {} for multiple in payload["cases"]}
    with loaded_model(cfg.load, meta.tp, calib.seq_length, cfg.seed) as model:  # the brute force, same windows
        scores = compute_scores("activation", meta.shape, model=model, calib=scoring)
        shard = model_shard(model)
        for multiple, keys in payload["cases"].items():
            for key in map(tuple, keys):
                layers, hidden, heads, groups, ffn = key
                target = PruneTarget(hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                                     ffn_hidden_size=ffn, num_layers=layers)
                pruned = pruned_model(shard, make_plan(scores, meta.shape, target, meta.tp, "activation"), meta,
                                      calib.seq_length)
                losses[multiple][key] = evaluate_megatron(pruned, held_out.windows, meta.shape.vocab_size,
                                                          calib.micro_batch_size).loss
    return {m: {"report": reports[m], "losses": losses[m]} for m in payload["cases"]}
