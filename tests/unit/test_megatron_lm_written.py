"""Checkpoints NVIDIA Megatron-LM wrote itself (tests/data/megatron-lm-written: legacy `torch` from its converter and
from pretrain_gpt.py, and `torch_dist`, its default): read with their real args (megatron-core enums,
signal.Signals, InferenceCudaGraphScope, numpy RNG states), exported, resharded, described for Megatron-LM.
References: the HF model they came from (hf/), and each other (the two iteration-6 files hold the same weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_prune.__main__ import main
from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.convert_files import megatron_to_hf
from megatron_prune.checkpoint.keys import to_local_names
from megatron_prune.checkpoint.reshard_files import reshard
from tests.helpers import random_tokens

WRITTEN = Path(__file__).resolve().parents[1] / "data" / "megatron-lm-written"
NAMES = ("convert_py_legacy_iter0", "pretrain_gpt_legacy_iter6", "pretrain_gpt_torch_dist_iter6")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mlm_written")
    for name in NAMES:
        megatron_to_hf(WRITTEN / name, out / name, progress=False)
    return out


def test_formats_detected():
    assert [mio.open_checkpoint(WRITTEN / n).format for n in NAMES] == ["torch", "torch", "torch_dist"]
    assert mio.open_checkpoint(WRITTEN / NAMES[0]).iteration == 0  # tracker "0": iter_0000000/


def test_iteration_6_legacy_and_torch_dist_export_identical_tensors(exported):
    a = load_file(exported / NAMES[1] / "model.safetensors")
    b = load_file(exported / NAMES[2] / "model.safetensors")
    assert sorted(a) == sorted(b) and len(a) == 3 + 9 * 4
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_converter_output_exports_the_logits_of_its_hf_source(exported):
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(WRITTEN / "hf").eval()
    got = LlamaForCausalLM.from_pretrained(exported / NAMES[0]).eval()
    assert got.config.vocab_size in (1000, 1024)  # without a true vocabulary size in the args: the padded rows
    tokens = random_tokens(1000)
    with torch.no_grad():
        want, have = ref(tokens).logits, got(tokens).logits
    assert (have[..., :1000] - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_reshard_each_to_tp1_and_back_bit_exact(name, tmp_path):
    """Legacy -> torch_dist -> legacy at the source's TP gives the source's tensors; every output exports alike."""
    src = WRITTEN / name
    tp = mio.read_meta(src).tp
    reshard(src, tmp_path / "tp1", tp=1, progress=False)
    reshard(src, tmp_path / "dist", tp=1, progress=False, ckpt_format="torch_dist")
    reshard(tmp_path / "dist", tmp_path / "back", tp=tp, progress=False)
    ck = mio.open_checkpoint(src)
    for r in range(tp):
        want = to_local_names(ck.load_rank(r, 0)["model"])
        got = to_local_names(mio.load_rank(tmp_path / "back", r, 0)["model"])
        assert all(torch.equal(got[k], v) for k, v in want.items() if isinstance(v, torch.Tensor)), (name, r)
    megatron_to_hf(tmp_path / "tp1", tmp_path / "hf_tp1", progress=False)
    megatron_to_hf(tmp_path / "dist", tmp_path / "hf_dist", progress=False)
    a, b = load_file(tmp_path / "hf_tp1/model.safetensors"), load_file(tmp_path / "hf_dist/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_megatron_lm_args_reads_each(name, capsys):
    capsys.readouterr()
    rc = main(["megatron-lm-args", "--load", str(WRITTEN / name), "--tokenizer", str(WRITTEN / "hf")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    words = out.replace("\\\n", " ").split()
    fmt = words[words.index("--ckpt-format") + 1]
    assert fmt == ("torch_dist" if "torch_dist" in name else "torch")
    assert words[words.index("--num-layers") + 1] == "4" and words[words.index("--norm-epsilon") + 1] == "1e-06"
    assert words[words.index("--tensor-model-parallel-size") + 1] == ("1" if "iter0" in name else "2")
    trained = "iter6" in name  # a training checkpoint: its optimizer continues with the saved schedule
    assert ("--use-checkpoint-opt_param-scheduler" in words) == trained and ("--no-load-optim" in words) != trained


def test_args_of_current_megatron_lm_are_inert_values():
    from megatron_prune.checkpoint.safe_pickle import Opaque

    args = mio.load_rank(WRITTEN / NAMES[0], 0, 0)["args"]
    assert isinstance(args.exit_signal, Opaque) and args.exit_signal.type_name == "signal.Signals"
    assert args.exit_signal.value == 15  # SIGTERM, kept as data
    assert isinstance(args.inference_cuda_graph_scope, Opaque)


def test_a_non_llama_torch_dist_checkpoint_is_one_line(tmp_path):
    """A torch_dist checkpoint whose args describe another architecture (here LayerNorm) is refused."""
    src = WRITTEN / NAMES[2]
    shutil.copytree(src, tmp_path / "ck")
    folder = tmp_path / "ck" / "iter_0000006"
    from megatron_prune.checkpoint import dist_ckpt

    common = dist_ckpt.read_common(dist_ckpt.read_index(folder))
    common["args"].normalization = "LayerNorm"
    for k, v in list(vars(common["args"]).items()):  # what we write back must be plain data
        if type(v).__name__ == "Opaque":
            delattr(common["args"], k)
    torch.save(common, folder / "common.pt")  # megatron-core <= 0.16's place for it, read first
    rc = main(["convert", "megatron-to-hf", "--load", str(tmp_path / "ck"), "--save", str(tmp_path / "out")])
    assert rc == 2 and not (tmp_path / "out").exists()
