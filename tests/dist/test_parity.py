"""Logit parity with HF transformers at TP=1, TP=2 and PP=2 (one torchrun launch for all cases)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megatron_prune.checkpoint.convert_files import hf_to_megatron
from megatron_prune.testing import run_distributed
from tests.helpers import VARIANTS, make_hf_model, random_tokens

pytestmark = pytest.mark.dist
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    cases, refs = [], {}
    for name, overrides in VARIANTS.items():
        model = make_hf_model(root / name, seed=len(cases), **overrides)
        tokens = random_tokens(model.config.vocab_size)
        with torch.no_grad():
            logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        refs[name] = (logits, loss.item())
        for layout, (tp, pp) in LAYOUTS.items():
            hf_to_megatron(root / name, root / f"{name}-{layout}", tp=tp, pp=pp, progress=False)
            cases.append({"name": f"{name}-{layout}", "ckpt": str(root / f"{name}-{layout}"), "tp": tp, "pp": pp,
                          "tokens": tokens.tolist()})
    per_rank = run_distributed(2, "tests.dist.cases:logits", {"cases": cases})
    got = {}
    for rank_result in per_rank:
        for case, r in rank_result.items():
            if r["logits"] is not None:
                got[case] = r
    return refs, got, per_rank


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf(parity, variant, layout):
    refs, got, _ = parity
    ref_logits, ref_loss = refs[variant]
    r = got[f"{variant}-{layout}"]
    assert r["logits"].shape == ref_logits.shape
    diff = (r["logits"] - ref_logits).abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| {diff:.3e}"
    assert abs(r["loss"] - ref_loss) <= 1e-5 * max(1.0, ref_loss)


def test_loss_known_on_every_rank(parity):
    _, _, per_rank = parity
    for case in per_rank[0]:
        assert abs(per_rank[0][case]["loss"] - per_rank[1][case]["loss"]) < 1e-6


def test_eval_cli_matches_hf(tmp_path):
    """`torchrun -m megatron_prune eval` at TP=2 gives HF's loss on the same text and windows."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megatron_prune.data.text import read_windows
    from megatron_prune.model.evaluate import evaluate_hf
    from tests.helpers import save_tiny_tokenizer

    tok_dir = save_tiny_tokenizer(tmp_path / "hf")
    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    make_hf_model(tmp_path / "hf", vocab_size=vocab)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=2, progress=False)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "megatron_prune", "eval", "--load", str(tmp_path / "mg"), "--text-file", str(text),
                          "--seq-length", "32", "--json"], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    windows = read_windows(str(text), str(tmp_path / "hf"), 32, None)
    ref = evaluate_hf(LlamaForCausalLM.from_pretrained(tmp_path / "hf"), windows)
    assert got["tokens"] == ref.tokens
    assert abs(got["loss"] - ref.loss) <= 1e-5 * ref.loss
