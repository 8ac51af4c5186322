"""Training observability: one record per log interval to stdout, metrics.jsonl and (when installed)
TensorBoard; model FLOPs per token, TFLOP/s per device and MFU.

FLOPs follow Megatron-LM's accounting (num_floating_point_operations): a forward pass costs 2 FLOPs per
multiply-accumulate of every weight matrix plus the attention score and context products (4 * s * d per
head and layer, full square, as Megatron counts); training costs 3x the forward (forward + 2x backward).
A distillation teacher adds its forward pass (1x).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from megatron_prune.config.shape import LlamaShape

# Dense bf16 peak TFLOP/s per device (vendor data sheets, no sparsity); --peak-tflops overrides. Matched as
# substrings of the CUDA device name in this order, so the more specific names come first ("H100 PCIe" before
# "H100", "L40S" before "L40" before "L4").
KNOWN_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "GH200": 989.0, "H200": 989.0, "H100": 989.0,
                     "H800": 989.0, "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0,
                     "L4": 121.0, "A10": 125.0}


def forward_flops_per_token(shape: LlamaShape, seq_length: int, padded_vocab: int | None = None) -> float:
    """Forward FLOPs per token (matmuls only: norms, softmax and elementwise work are ignored)."""
    h, f, d = shape.hidden_size, shape.ffn_hidden_size, shape.kv_channels
    q, kv = shape.num_attention_heads * d, shape.num_query_groups * d
    per_layer = 2 * (h * (q + 2 * kv) + q * h + 3 * h * f) + 4 * seq_length * q
    return float(shape.num_layers * per_layer + 2 * h * (padded_vocab or shape.vocab_size))


def train_flops_per_token(shape: LlamaShape, seq_length: int, padded_vocab: int | None = None,
                          teacher: LlamaShape | None = None, teacher_vocab: int | None = None) -> float:
    flops = 3 * forward_flops_per_token(shape, seq_length, padded_vocab)
    if teacher is not None:
        flops += forward_flops_per_token(teacher, seq_length, teacher_vocab)
    return flops


def peak_tflops_for(device_name: str) -> float | None:
    return next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in device_name), None)


def default_peak_tflops() -> float | None:
    return peak_tflops_for(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def memory_stats() -> dict[str, float]:
    """GiB: peak allocated GPU memory (CUDA), and this process's peak resident memory."""
    out = {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["mem_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        out["mem_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def throughput(tokens: int, seconds: float, flops_per_token: float, world_size: int,
               peak_tflops: float | None) -> dict[str, float]:
    seconds = max(seconds, 1e-12)
    tflops = tokens * flops_per_token / seconds / world_size / 1e12
    out = {"tokens_per_s": tokens / seconds, "tflops_per_device": tflops}
    if peak_tflops:
        out["mfu"] = tflops / peak_tflops
    return out


def format_record(rec: dict[str, Any]) -> str:
    """One human-readable line, Megatron-LM style."""
    kind = rec.get("kind", "train")
    parts = [f"{kind:>5} iter {rec['iteration']:>7}", f"tokens {rec['tokens']:>12,}"]
    for key, fmt in (("lm_loss", "lm loss {:.6f}"), ("kd_loss", "kd loss {:.6f}"), ("lr", "lr {:.3e}"),
                     ("grad_norm", "grad norm {:.4f}"), ("loss_scale", "loss scale {:.1f}"),
                     ("tokens_per_s", "{:,.0f} tok/s"), ("step_time_s", "step {:.3f} s"),
                     ("tflops_per_device", "{:.3g} TFLOP/s/dev"), ("mfu", "MFU {:.1%}"),
                     ("mem_max_allocated_gib", "mem {:.2f} GiB"), ("max_rss_gib", "rss {:.2f} GiB"),
                     ("skipped", "skipped {}")):
        value = rec.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts.append(fmt.format(value))
    return " | ".join(parts)


class IntervalStats:
    """Accumulates the training steps (loop.StepResult) of one log interval into one record."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps, self.seconds, self.tokens, self.lm, self.kd, self.skipped = 0, 0.0, 0, 0.0, 0.0, 0
        self.last = None

    def add(self, res, seconds: float, tokens: int) -> None:
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens
        self.last = res
        if res.skipped:
            self.skipped += 1
        else:
            self.lm += res.lm_loss
            self.kd += res.kd_loss or 0.0

    def record(self, iteration: int, tokens_consumed: int, distilling: bool, flops_per_token: float,
               world_size: int, peak: float | None) -> dict[str, Any]:
        """Mean losses over the interval's applied steps; LR, grad norm and loss scale of its last step."""
        good = self.steps - self.skipped
        res = self.last
        rec = {"kind": "train", "iteration": iteration, "tokens": tokens_consumed,
               "lm_loss": self.lm / good if good else float("nan"),
               "kd_loss": (self.kd / good if good else float("nan")) if distilling else None, "lr": res.lr,
               "grad_norm": res.grad_norm, "loss_scale": res.loss_scale, "skipped": self.skipped,
               "step_time_s": self.seconds / self.steps}
        rec.update(throughput(self.tokens, self.seconds, flops_per_token, world_size, peak))
        rec.update(memory_stats())
        return {k: v for k, v in rec.items() if v is not None}


class MetricsWriter:
    """Writes records on one rank (the caller passes enabled=False elsewhere)."""

    def __init__(self, jsonl: str | Path | None, tensorboard_dir: str | None = None, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._file = None
        self._tb = None
        if not enabled:
            return
        if jsonl:
            Path(jsonl).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(jsonl, "a", buffering=1)
        if tensorboard_dir:
            self._tb = _tensorboard_writer(tensorboard_dir, self.stream)

    def write(self, rec: dict[str, Any], line: str | None = None) -> None:
        """Print `line` (default: the record formatted Megatron-LM style) and append the record to the files."""
        if not self.enabled:
            return
        print(line or format_record(rec), file=self.stream, flush=True)
        if self._file:
            self._file.write(json.dumps(rec) + "\n")
        if self._tb:
            prefix = rec.get("kind", "train")
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("iteration", "tokens"):
                    self._tb.add_scalar(f"{prefix}/{k}", v, global_step=rec["tokens"])
            self._tb.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()


def _tensorboard_writer(log_dir: str, stream: TextIO):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: stdout + jsonl only
        print(f"note: tensorboard is not installed; not writing {log_dir} (pip install tensorboard)",
              file=stream, flush=True)
        return None
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file (blank and truncated last lines are skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
