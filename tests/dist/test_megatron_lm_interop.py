"""A checkpoint saved the way Megatron-LM saves one (megatron-core's own GPTModel, args with megatron-core enums
and Megatron-LM's current field names, iteration 0 as iter_0000000 + tracker "0") exports to HF with the original
HF model's logits, and reshards."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_prune.checkpoint.convert_files import megatron_to_hf
from megatron_prune.checkpoint.reshard_files import reshard
from megatron_prune.testing import run_distributed
from tests.helpers import VARIANTS, make_hf_model, random_tokens

pytestmark = pytest.mark.dist


def test_megatron_lm_saved_checkpoint_exports_with_hf_logits(tmp_path):
    from transformers import LlamaForCausalLM

    ref = make_hf_model(tmp_path / "hf", **VARIANTS["llama3rope"], rms_norm_eps=1e-6)
    (missing,) = run_distributed(1, "tests.dist.interop_cases:save_like_megatron_lm",
                                 {"hf": str(tmp_path / "hf"), "save": str(tmp_path / "mlm")})
    assert all(k.endswith("_extra_state") for k in missing), missing
    assert not (tmp_path / "mlm/megatron_prune.json").exists()

    megatron_to_hf(tmp_path / "mlm", tmp_path / "back", progress=False)
    cfg = json.loads((tmp_path / "back/config.json").read_text())
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_scaling"]["rope_type"] == "llama3"
    a, b = load_file(tmp_path / "hf/model.safetensors"), load_file(tmp_path / "back/model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    tokens = random_tokens(ref.config.vocab_size)
    with torch.no_grad():
        want = ref(tokens).logits
        got = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()(tokens).logits
    assert torch.equal(got, want), (got - want).abs().max().item()

    reshard(tmp_path / "mlm", tmp_path / "tp2", tp=2, progress=False)
    megatron_to_hf(tmp_path / "tp2", tmp_path / "back2", progress=False)
    c = load_file(tmp_path / "back2/model.safetensors")
    assert sorted(a) == sorted(c) and all(torch.equal(a[k], c[k]) for k in a)
