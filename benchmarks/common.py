"""Shared benchmark plumbing: synthetic LLaMA checkpoints, timed subprocesses with peak RSS, RESULTS.md sections."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")

SHAPES = {  # HF config fields
    "7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
}


def parser(description: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line: its module docstring as the help text, and --no-write (print the results,
    leave RESULTS.md alone), which every benchmark has."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print the results, leave RESULTS.md alone")
    return ap


def synthetic_parser(description: str | None, tp: int = 8) -> argparse.ArgumentParser:
    """The size benchmarks on synthetic LLaMA checkpoints (SHAPES): --shape, --layers, --tp, --workdir."""
    ap = parser(description)
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES), help="LLaMA shape (default 7b)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (the same tensor shapes)")
    ap.add_argument("--tp", type=int, default=tp, help=f"tensor-parallel size (default {tp})")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    return ap


def recovery_parser(description: str | None, iters_help: str, eval_tokens: int = 8192) -> argparse.ArgumentParser:
    """The quality benchmarks on SmolLM2 (recovery runs): --iters, --eval-tokens, --work."""
    ap = parser(description)
    ap.add_argument("--iters", type=int, default=60, help=iters_help)
    ap.add_argument("--eval-tokens", type=int, default=eval_tokens, help=f"held-out tokens (default {eval_tokens})")
    ap.add_argument("--work", default=None, help="working directory, finished runs reused (default: a temporary "
                                                 "one, removed)")
    return ap


def hf_config(shape: str, layers: int | None) -> dict:
    cfg = dict(SHAPES[shape], model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
               max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
               dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    if layers:
        cfg["num_hidden_layers"] = layers
    return cfg


def layer_tensors(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}


def write_synthetic_hf(out: Path, cfg: dict, layers_per_file: int = 2) -> int:
    """Random bf16 weights as sharded safetensors + index, written a few layers at a time (bounded memory)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    v, h = cfg["vocab_size"], cfg["hidden_size"]
    groups = [{"model.embed_tokens.weight": (v, h)}]
    for start in range(0, cfg["num_hidden_layers"], layers_per_file):
        g = {}
        for i in range(start, min(start + layers_per_file, cfg["num_hidden_layers"])):
            g.update(layer_tensors(cfg, i))
        groups.append(g)
    groups.append({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for n, group in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: torch.empty(s, dtype=torch.bfloat16).normal_(generator=gen) for k, s in group.items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({k: name for k in group})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def largest_file(path: Path, pattern: str = "*") -> int:
    return max(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds incl. a final sync, peak RSS bytes) of a command, as /usr/bin/time -v reports them."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    subprocess.run(["sync"], check=True)  # count the write-back, as plain_copy does
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, rss_kb * 1024


def plain_copy(src: Path, dst: Path) -> float:
    """Seconds to copy the same bytes with cp (+ sync), the baseline for I/O-bound tools."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_prune", *args]


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between <!-- name --> markers in RESULTS.md."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nMeasured on this project's CPU machines unless a section says otherwise.\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def cleanup(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
