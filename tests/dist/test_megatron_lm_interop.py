"""A checkpoint saved the way Megatron-LM saves one (megatron-core's own GPTModel, args with megatron-core enums
and Megatron-LM's current field names, iteration 0 as iter_0000000 + tracker "0") exports to HF with the original
HF model's logits, and reshards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.convert_files import hf_to_megatron, megatron_to_hf
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


WRITTEN = Path(__file__).resolve().parents[1] / "data" / "megatron-lm-written"


def test_torch_dist_with_megatron_core_and_megatron_lm_checkpoints(tmp_path):
    """One launch: megatron-core loads our torch_dist conversion (TP=1 and TP=2: HF's logits); a checkpoint saved by
    megatron-core's dist_checkpointing at TP=2 exports with HF's logits, reshards to legacy TP=1 with the same
    tensors; it and the three Megatron-LM-written checkpoints prune (random) to HF models of the asked size."""
    from transformers import LlamaForCausalLM

    hf = WRITTEN / "hf"
    ref = LlamaForCausalLM.from_pretrained(hf).eval()
    tokens = random_tokens(ref.config.vocab_size)
    with torch.no_grad():
        want = ref(tokens).logits
    hf_to_megatron(hf, tmp_path / "ours", tp=2, progress=False, ckpt_format="torch_dist")
    reshard(WRITTEN / "convert_py_legacy_iter0", tmp_path / "iter0_tp2", tp=2, progress=False)
    prune = [(str(tmp_path / "mlm"), str(tmp_path / "p_mlm"), "torch_dist"),
             (str(tmp_path / "iter0_tp2"), str(tmp_path / "p_iter0"), "torch"),
             (str(WRITTEN / "pretrain_gpt_legacy_iter6"), str(tmp_path / "p_legacy6"), "torch"),
             (str(WRITTEN / "pretrain_gpt_torch_dist_iter6"), str(tmp_path / "p_dist6"), "torch_dist")]
    (out, _) = run_distributed(2, "tests.dist.interop_cases:torch_dist_interop",
                               {"hf": str(hf), "ours": str(tmp_path / "ours"), "mlm": str(tmp_path / "mlm"),
                                "tokens": tokens.tolist(), "prune": prune})
    for name in ("ours_tp1", "ours_tp2", "mlm_tp2_logits"):
        got = out[name][..., :want.shape[-1]]
        assert (got - want).abs().max().item() <= 1e-4, name

    mlm = tmp_path / "mlm"
    assert not (mlm / "megatron_prune.json").exists() and (mlm / "iter_0000003" / "metadata.json").is_file()
    megatron_to_hf(mlm, tmp_path / "mlm_hf", progress=False)
    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(tmp_path / "mlm_hf").eval()(tokens).logits
    assert (got[..., :want.shape[-1]] - want).abs().max().item() <= 1e-5
    reshard(mlm, tmp_path / "mlm_tp1", tp=1, progress=False)
    megatron_to_hf(tmp_path / "mlm_tp1", tmp_path / "mlm_tp1_hf", progress=False)
    a, b = load_file(tmp_path / "mlm_hf/model.safetensors"), load_file(tmp_path / "mlm_tp1_hf/model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    for _, save, fmt in prune:
        assert mio.checkpoint_format(save) == fmt
        megatron_to_hf(save, tmp_path / f"{Path(save).name}_hf", progress=False)
        cfg = json.loads((tmp_path / f"{Path(save).name}_hf" / "config.json").read_text())
        assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (48, 64, 3), save
