"""Resharded checkpoints in megatron-core (one torchrun launch): an uneven (global-mode) checkpoint resharded to
even TP=2 and to TP=1/PP=2 gives the logits of transformers on the HF export of the uneven checkpoint; an even
checkpoint resharded TP=2 -> TP=1/PP=2 keeps its eval loss."""

from __future__ import annotations

import pytest
import torch

from megatron_prune.checkpoint.convert_files import hf_to_megatron, megatron_to_hf
from megatron_prune.checkpoint.reshard_files import reshard
from megatron_prune.testing import run_distributed
from tests.helpers import make_hf_model, random_tokens
from tests.unit.test_reshard import UNEVEN_MODEL, make_uneven

pytestmark = pytest.mark.dist
VOCAB = UNEVEN_MODEL["vocab_size"]


def hf_logits_and_loss(hf_dir, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return logits, loss.item()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard_dist")
    make_hf_model(root / "hf", **UNEVEN_MODEL)
    hf_to_megatron(root / "hf", root / "tp2", tp=2, progress=False)
    reshard(root / "tp2", root / "tp2-to-tp1pp2", tp=1, pp=2, progress=False)
    make_uneven(root / "tp2", root / "uneven")
    megatron_to_hf(root / "uneven", root / "uneven-hf", progress=False)
    reshard(root / "uneven", root / "uneven-to-tp2", tp=2, progress=False)
    reshard(root / "uneven", root / "uneven-to-tp1pp2", tp=1, pp=2, progress=False)
    tokens = random_tokens(VOCAB, batch=2, seq=33)
    cases = [{"name": name, "ckpt": str(root / name), "tp": tp, "pp": pp, "tokens": tokens.tolist()}
             for name, tp, pp in (("tp2", 2, 1), ("tp2-to-tp1pp2", 1, 2), ("uneven-to-tp2", 2, 1),
                                  ("uneven-to-tp1pp2", 1, 2))]
    got = {}
    for rank in run_distributed(2, "tests.dist.cases:logits", {"cases": cases}):
        for name, r in rank.items():
            if r["logits"] is not None:
                got[name] = r
    refs = {"even": hf_logits_and_loss(root / "hf", tokens), "uneven": hf_logits_and_loss(root / "uneven-hf", tokens)}
    return got, refs


@pytest.mark.parametrize("case", ["uneven-to-tp2", "uneven-to-tp1pp2"])
def test_uneven_resharded_matches_hf_export_of_uneven(results, case):
    got, refs = results
    ref_logits, ref_loss = refs["uneven"]
    assert got[case]["logits"].shape == ref_logits.shape
    diff = (got[case]["logits"] - ref_logits).abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| {diff:.3e}"
    assert abs(got[case]["loss"] - ref_loss) <= 1e-5 * ref_loss


def test_eval_loss_same_at_new_layout(results):
    got, refs = results
    old, new = got["tp2"]["loss"], got["tp2-to-tp1pp2"]["loss"]
    assert abs(new - old) <= 1e-5 * abs(old), (old, new)
    assert abs(old - refs["even"][1]) <= 1e-5 * refs["even"][1]  # and both are the HF model's loss
    assert (got["tp2"]["logits"] - got["tp2-to-tp1pp2"]["logits"]).abs().max() <= 1e-4
