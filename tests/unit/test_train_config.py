"""TrainConfig validation and loading, CLI precedence, batch slicing, checkpoint pruning, metrics, plot."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import types

import pytest
import torch

from megatron_prune.train.config import ConfigError, TrainConfig, parse_blend, parse_split, read_config_file

BASE = dict(load="ckpt", data_path=["data/corpus_text_document"], train_iters=10)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**BASE, **kw})


# ---------------------------------------------------------------------------------------------- config
def test_defaults_and_derived_values():
    c = cfg(global_batch_size=16, seq_length=128, precision="fp16")
    assert c.iterations == 10 and c.decay_iters == 10 and c.dtype == "float16"
    assert c.tokens_per_iteration == 16 * 128
    assert cfg(train_iters=None, train_tokens=16 * 128 * 5 + 1, global_batch_size=16, seq_length=128).iterations == 6


@pytest.mark.parametrize("kw,match", [
    (dict(load=""), "--load is required"),
    (dict(data_path=[]), "--data-path is required"),
    (dict(train_iters=None), r"give --train-iters N \(iterations\) or --train-tokens N"),
    (dict(train_tokens=100), r"not both \(--train-iters 10, --train-tokens 100\)"),
    (dict(min_lr=1.0, lr=0.1), r"--min-lr 1.0, --lr 0.1"),
    (dict(lr_decay_style="step"), "not one of cosine, linear, constant"),
    (dict(lr_warmup_iters=11), r"--lr-warmup-iters 11 must be fewer than the decay iterations 10"),
    (dict(lr_warmup_iters=10), r"--lr-warmup-iters 10 must be fewer than the decay iterations 10"),  # asserts in mcore
    (dict(precision="fp8"), "not one of bf16, fp16, fp32"),
    (dict(kd_alpha=1.5), "--kd-alpha 1.5"),
    (dict(micro_batch_size=0), "--micro-batch-size must be a positive integer"),
    (dict(save_interval=5), "need --save"),
    (dict(data_path=["0.5", "a", "b"]), "weight/prefix pairs"),
    (dict(split="a,b"), "comma-separated numbers"),
])
def test_invalid_settings_name_every_factor(kw, match):
    with pytest.raises(ConfigError, match=match):
        cfg(**kw)


def test_layout_divisibility_message_lists_all_factors():
    c = cfg(tp=2, micro_batch_size=3, global_batch_size=8)
    with pytest.raises(ConfigError, match=r"--global-batch-size 8 .* --micro-batch-size 3 x data-parallel 2 "
                                          r"\(world 4 = --tp 2 x --pp 1 x dp 2\)"):
        c.layout(4)
    with pytest.raises(ConfigError, match="world size 3 is not divisible by --tp x --pp = 2 x 1"):
        c.layout(3)
    good = cfg(tp=2, micro_batch_size=2, global_batch_size=8).layout(4)
    assert (good.dp, good.num_microbatches) == (2, 2)


def test_blend_and_split_parsing():
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert cfg(data_path="0.3 a 0.7 b").data_path == ("0.3", "a", "0.7", "b")
    with pytest.raises(ConfigError, match="positive"):
        parse_blend(["0", "a"])
    assert parse_split("98,2") == [98.0, 2.0, 0.0]
    with pytest.raises(ConfigError):
        parse_split("0,1,0")


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "c.yaml").write_text("load: ckpt\ndata-path: [d1]\ntrain_iters: 5\nlr: 0.001\n")
    (tmp_path / "c.json").write_text(json.dumps({"load": "ckpt", "data_path": ["d1"], "train-tokens": 999}))
    y = TrainConfig.from_mapping(read_config_file(tmp_path / "c.yaml"))
    j = TrainConfig.from_mapping(read_config_file(tmp_path / "c.json"))
    assert (y.train_iters, y.lr, y.data_path) == (5, 0.001, ("d1",))
    assert j.train_tokens == 999
    with pytest.raises(ConfigError, match="unknown setting\\(s\\) bogus, tensor_parallel"):
        TrainConfig.from_mapping({**BASE, "bogus": 1, "tensor-parallel": 2})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="invalid JSON"):
        read_config_file(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="not found"):
        read_config_file(tmp_path / "missing.yaml")


def test_cli_overrides_config_file(tmp_path):
    from megatron_prune.cli import train as cli

    (tmp_path / "c.yaml").write_text("load: ckpt\ndata_path: [d1]\ntrain_iters: 5\nlr: 0.001\ntp: 2\n")
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.02", "--tensor-model-parallel-size", "4",
                         "--fp16", "--data-path", "0.4", "x", "0.6", "y", "--sequence-parallel", "--no-save"])
    c = cli.build_config(args)
    assert (c.lr, c.tp, c.precision, c.train_iters, c.sequence_parallel) == (0.02, 4, "fp16", 5, True)
    assert c.data_path == ("0.4", "x", "0.6", "y")
    assert cli.build_config(p.parse_args(["--load", "a", "--data-path", "d", "--train-iters", "3",
                                          "--save", str(tmp_path / "s")])).lr == 1e-4


def test_cli_user_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megatron_prune", "train", "--load", str(tmp_path), "--data-path",
                          str(tmp_path / "none"), "--train-iters", "2", "--no-save"],
                         capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 2
    # torch's own glog-style log lines (e.g. "W1202 05:40:19.92 ... No CUDA runtime is found" from a CUDA build of
    # torch on a machine without CUDA, as in the compatibility lane) are not ours: our report is one line.
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and not re.match(r"[WIE]\d{4} \d\d:\d\d:", ln)]
    assert len(lines) == 1 and lines[0].startswith("error: indexed dataset(s) not found"), out.stderr


# ---------------------------------------------------------------------------------------------- data order
@pytest.mark.parametrize("dp,mbs", [(1, 1), (1, 4), (2, 2), (4, 1), (8, 1)])
def test_global_batch_is_the_same_samples_for_any_dp(dp, mbs):
    from megatron_prune.train.data import BatchPlan

    gbs, start = 8, 24
    per_rank = [BatchPlan(gbs, mbs, dp, r).sample_indices(start) for r in range(dp)]
    flat = sorted(i for rank in per_rank for mb in rank for i in mb)
    assert flat == list(range(start, start + gbs))
    assert all(len(mb) == mbs for rank in per_rank for mb in rank)
    # micro-batch j of all ranks together is the j-th slice of the global batch (Megatron-LM's sampler)
    j0 = sorted(i for rank in per_rank for i in rank[0])
    assert j0 == list(range(start, start + mbs * dp))


# ---------------------------------------------------------------------------------------------- checkpoints
def test_prune_old_checkpoints_keeps_newest_and_tracked(tmp_path):
    from megatron_prune.checkpoint.megatron_io import write_tracker
    from megatron_prune.train.checkpointing import prune_old_checkpoints

    for i in (5, 10, 15, 20):
        (tmp_path / f"iter_{i:07d}").mkdir()
    (tmp_path / "release").mkdir()
    write_tracker(tmp_path, 20)
    removed = prune_old_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["iter_0000005", "iter_0000010"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["iter_0000015", "iter_0000020", "release"]
    write_tracker(tmp_path, 15)  # a tracked checkpoint older than newer leftovers is never deleted
    (tmp_path / "iter_0000025").mkdir()
    prune_old_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000015", "iter_0000025"]
    assert prune_old_checkpoints(tmp_path, keep_last=0) == []


# ---------------------------------------------------------------------------------------------- metrics
def test_flops_per_token_counts_every_weight_matrix():
    """Independent count: 2 FLOPs per weight of every HF linear (LM head included) + attention products."""
    from transformers import LlamaForCausalLM

    from megatron_prune.config.shape import LlamaShape
    from megatron_prune.train.metrics import forward_flops_per_token, train_flops_per_token
    from tests.helpers import llama_config

    hf_cfg = llama_config(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2)
    model = LlamaForCausalLM(hf_cfg)
    matmul_weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    seq = 64
    attention = 3 * 2 * 2 * seq * hf_cfg.num_attention_heads * hf_cfg.head_dim  # QK^T and PV per layer
    shape = LlamaShape.from_hf_config(hf_cfg.to_dict())
    assert forward_flops_per_token(shape, seq) == 2 * matmul_weights + attention
    assert train_flops_per_token(shape, seq) == 3 * forward_flops_per_token(shape, seq)
    assert train_flops_per_token(shape, seq, teacher=shape) == 4 * forward_flops_per_token(shape, seq)


def test_throughput_and_mfu():
    from megatron_prune.train.metrics import throughput

    t = throughput(tokens=1000, seconds=2.0, flops_per_token=1e12, world_size=4, peak_tflops=250.0)
    assert t["tokens_per_s"] == 500.0 and t["tflops_per_device"] == 125.0 and t["mfu"] == 0.5
    assert "mfu" not in throughput(1000, 2.0, 1e12, 4, None)


def test_metrics_writer_stdout_jsonl_tensorboard(tmp_path, monkeypatch):
    from megatron_prune.train.metrics import MetricsWriter, read_metrics

    scalars = []
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = lambda log_dir: types.SimpleNamespace(
        add_scalar=lambda tag, v, global_step: scalars.append((tag, v, global_step)), flush=lambda: None,
        close=lambda: None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    out = io.StringIO()
    w = MetricsWriter(tmp_path / "m.jsonl", str(tmp_path / "tb"), stream=out)
    w.write({"kind": "train", "iteration": 3, "tokens": 768, "lm_loss": 2.5, "lr": 1e-3, "tokens_per_s": 99.0})
    w.write({"kind": "eval", "iteration": 3, "tokens": 768, "lm_loss": 2.7})
    w.close()
    assert "train iter       3" in out.getvalue() and "lm loss 2.500000" in out.getvalue()
    assert [r["lm_loss"] for r in read_metrics(tmp_path / "m.jsonl")] == [2.5, 2.7]
    assert ("train/lm_loss", 2.5, 768) in scalars and ("eval/lm_loss", 2.7, 768) in scalars
    MetricsWriter(tmp_path / "off.jsonl", enabled=False).write({"iteration": 1, "tokens": 1})
    assert not (tmp_path / "off.jsonl").exists()


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_prune.cli import plot

    run = tmp_path / "run"
    run.mkdir()
    recs = [{"kind": "train", "iteration": i, "tokens": 256 * i, "lm_loss": 6.0 - 0.1 * i} for i in range(1, 6)]
    recs.append({"kind": "eval", "iteration": 5, "tokens": 1280, "lm_loss": 5.6})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"trunc')
    p = argparse.ArgumentParser()
    plot.add_arguments(p)
    assert plot.run(p.parse_args([str(run), "--out", str(tmp_path / "loss.png")])) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    x, y = plot.series(recs, "eval", "lm_loss")
    assert (x, y) == ([1280], [5.6])
    from megatron_prune.__main__ import main  # the one place the user-error contract is applied

    assert main(["plot", str(tmp_path / "missing.jsonl")]) == 2


# ---------------------------------------------------------------------------------------------- cpu compat
@pytest.mark.skipif(torch.cuda.is_available(), reason="the adaptation is inactive with CUDA")
def test_cuda_type_names_only_inside_the_block():
    from megatron_prune.train.cpu_compat import cuda_type_names

    x, h = torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)
    with cuda_type_names():
        assert (x.type(), h.type()) == ("torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor")
        assert x.type(torch.float64).dtype == torch.float64
    assert x.type() == "torch.FloatTensor"
