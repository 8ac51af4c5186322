"""Taylor importance (--importance taylor) of a TP=2 sharded model against a reference computed here on the HF
model with torch autograd, sliced per structure in HF layout by this file's own code; and TP=1 vs TP=2 plans
through the `prune` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_prune.checkpoint.convert_files import hf_to_megatron
from megatron_prune.testing import run_distributed
from tests.helpers import make_hf_model

pytestmark = pytest.mark.dist
VOCAB = 500  # padded to 512 at TP=2: padded rows must contribute nothing
GQA = dict(num_attention_heads=8, num_key_value_heads=4, vocab_size=VOCAB)
SEQ, SAMPLES, MICRO = 16, 6, 4  # batches of 4 and 2


def hf_taylor(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: |sum of w * dL/dw| per structure, L = mean token cross-entropy over all windows at once."""
    cfg = model.config
    d, groups, heads = cfg.head_dim, cfg.num_key_value_heads, cfg.num_attention_heads
    model.zero_grad(set_to_none=True)
    logits = model(windows[:, :-1]).logits
    labels = windows[:, 1:]
    (F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
     / labels.numel()).backward()

    def wg(p):
        return (p.detach() * p.grad).double()

    m = model.model
    hidden = wg(m.embed_tokens.weight).sum(0) + wg(m.norm.weight)
    if not cfg.tie_word_embeddings:
        hidden += wg(model.lm_head.weight).sum(0)
    per_head, per_group, ffn = [], [], []
    for layer in m.layers:
        at, mlp = layer.self_attn, layer.mlp
        q, k, v, o = wg(at.q_proj.weight), wg(at.k_proj.weight), wg(at.v_proj.weight), wg(at.o_proj.weight)
        gate, up, down = wg(mlp.gate_proj.weight), wg(mlp.up_proj.weight), wg(mlp.down_proj.weight)
        h = (q.sum(1).view(heads, d).sum(1) + o.sum(0).view(heads, d).sum(1)).view(groups, heads // groups)
        per_head.append(h)
        per_group.append(h.sum(1) + k.sum(1).view(groups, d).sum(1) + v.sum(1).view(groups, d).sum(1))
        ffn.append(gate.sum(1) + up.sum(1) + down.sum(0))
        hidden += (q.sum(0) + k.sum(0) + v.sum(0) + gate.sum(0) + up.sum(0) + o.sum(1) + down.sum(1)
                   + wg(layer.input_layernorm.weight) + wg(layer.post_attention_layernorm.weight))
    with torch.no_grad():
        hs = model(windows[:, :-1], output_hidden_states=True).hidden_states
    bi = [(1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1)).mean() for i in range(len(m.layers) - 1)]
    return {"hidden": hidden.abs(), "heads": torch.stack(per_head).abs(), "groups": torch.stack(per_group).abs(),
            "ffn": torch.stack(ffn).abs(), "layers": torch.stack(bi)}  # HF's last hidden state is after the norm


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("taylor")
    models = {"untied": make_hf_model(root / "untied", seed=7, **GQA),
              "tied": make_hf_model(root / "tied", seed=8, tie_word_embeddings=True, **GQA)}
    for name in models:
        hf_to_megatron(root / name, root / f"{name}-tp2", tp=2, progress=False)
    windows = torch.randint(0, VOCAB, (SAMPLES, SEQ + 1), generator=torch.Generator().manual_seed(3))
    cases = [{"name": n, "load": str(root / f"{n}-tp2"), "windows": windows.tolist(), "micro_batch_size": MICRO}
             for n in models]
    cases.append({**cases[0], "name": "untied-frozen", "frozen": True})
    per_rank = run_distributed(2, "tests.dist.taylor_cases:taylor", {"cases": cases})
    return {"root": root, "models": models, "windows": windows, "per_rank": per_rank}


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """Within `rel` of the largest reference score (fp32 sums of signed terms: elementwise relative error
    of a score near 0 after cancellation says nothing)."""
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    scale = ref.abs().max().item()
    err = (got.double() - ref).abs().max().item()
    assert scale > 0 and err <= rel * scale, (name, err, scale)
    big = ref.abs() >= 0.1 * scale  # and elementwise, wherever cancellation cannot dominate
    worst = ((got.double() - ref).abs() / ref.abs())[big].max().item()
    assert worst <= rel, (name, worst)


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_taylor_scores_at_tp2_equal_hf_autograd_reference(world, name):
    ref = hf_taylor(world["models"][name], world["windows"])
    runs = [r[name] for r in world["per_rank"]]
    for field in ("hidden", "heads", "groups", "ffn"):
        got = runs[0]["scores"][field]
        assert torch.equal(got, runs[1]["scores"][field]), field  # every rank holds the same global scores
        assert_close(field, got, ref[field])
    assert_close("layers", runs[0]["scores"]["layers"][:-1], ref["layers"])
    # a group's score is its own signed sum, not the sum of its heads' absolute scores
    assert not torch.allclose(runs[0]["scores"]["groups"], runs[0]["scores"]["heads"].sum(-1))
    for run in runs:
        assert run["grads_left"] == [] and not run["graph_kept"] and run["frozen_after"] == []


def test_frozen_parameters_are_scored_and_left_frozen(world):
    for run in world["per_rank"]:
        frozen, free = run["untied-frozen"], run["untied"]
        assert all(torch.equal(frozen["scores"][f], free["scores"][f]) for f in ("hidden", "heads", "groups", "ffn"))
        assert frozen["grads_left"] == [] and frozen["frozen_after"] == frozen["params"]


def write_indexed(prefix, n: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(5))
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    builder.add_document(ids, [len(ids)])
    builder.finalize(f"{prefix}.idx")


@pytest.mark.slow  # two CLI prunes; the scores themselves are compared with HF autograd above
def test_taylor_plan_via_cli_is_the_same_at_tp1_and_tp2(world):
    root = world["root"]
    hf_to_megatron(root / "untied", root / "untied-tp1", tp=1, progress=False)
    write_indexed(root / "calib", 8 * SEQ + 40)
    args = ["-m", "megatron_prune", "prune", "--importance", "taylor", "--prune-type", "global",
            "--hidden-size-remain", "48", "--num-attention-heads-remain", "3", "--num-query-groups-remain", "3",
            "--ffn-hidden-size-remain", "60", "--num-layers-remain", "3", "--calib-data", str(root / "calib"),
            "--calib-samples", "8", "--calib-seq-length", str(SEQ), "--calib-micro-batch-size", "4",
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plans = []
    for tp, launcher in ((1, []), (2, ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"])):
        out = root / f"cli-tp{tp}"
        proc = subprocess.run([sys.executable, *launcher, *args, "--load", str(root / f"untied-tp{tp}"),
                               "--save", str(out)], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        plans.append(json.loads((out / "prune_plan.json").read_text()))
    one, two = plans
    assert one["method"] == two["method"] == "taylor"
    for key in ("hidden", "dropped_layers", "layers", "target_shape", "calibration"):
        assert one[key] == two[key], key
    assert len(one["dropped_layers"]) == 1 and len(one["hidden"]) == 48
