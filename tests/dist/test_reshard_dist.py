"""Resharded checkpoints in megatron-core: uneven -> even gives HF's logits; eval loss unchanged across TP/PP."""

from __future__ import annotations

import pytest
import torch

from megatron_prune.checkpoint.convert_files import hf_to_megatron
from megatron_prune.checkpoint.reshard_files import reshard
from megatron_prune.testing import run_distributed
from tests.helpers import make_hf_model, random_tokens
from tests.reshard_helpers import UNEVEN_MODEL, expected_uneven_hf, make_uneven

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard_dist")
    make_hf_model(root / "hf", **UNEVEN_MODEL)
    hf_to_megatron(root / "hf", root / "tp2", tp=2, progress=False)
    make_uneven(root / "tp2", root / "uneven")
    expected_uneven_hf(root / "hf", root / "expected")
    reshard(root / "uneven", root / "even-pp2", tp=1, pp=2, progress=False)
    reshard(root / "tp2", root / "tp1pp2", tp=1, pp=2, progress=False)
    tokens = random_tokens(1000, batch=2, seq=33).tolist()
    cases = [{"name": "source-tp2", "ckpt": str(root / "tp2"), "tp": 2, "pp": 1, "tokens": tokens},
             {"name": "resharded-tp1pp2", "ckpt": str(root / "tp1pp2"), "tp": 1, "pp": 2, "tokens": tokens},
             {"name": "uneven->tp1pp2", "ckpt": str(root / "even-pp2"), "tp": 1, "pp": 2, "tokens": tokens}]
    got = {}
    for rank in run_distributed(2, "tests.dist.cases:logits", {"cases": cases}):
        for name, r in rank.items():
            if r["logits"] is not None:
                got[name] = r
    return root, torch.tensor(tokens), got


def test_uneven_resharded_matches_hf_of_uneven_model(results):
    from transformers import LlamaForCausalLM

    root, tokens, got = results
    model = LlamaForCausalLM.from_pretrained(root / "expected").eval()
    with torch.no_grad():
        ref = model(tokens[:, :-1]).logits
    diff = (got["uneven->tp1pp2"]["logits"] - ref).abs().max().item()
    assert diff <= 1e-4, diff


def test_eval_loss_same_at_new_layout(results):
    _, _, got = results
    a, b = got["source-tp2"]["loss"], got["resharded-tp1pp2"]["loss"]
    assert abs(a - b) <= 1e-5 * abs(a)
    assert (got["source-tp2"]["logits"] - got["resharded-tp1pp2"]["logits"]).abs().max() <= 1e-4
