"""What runs inside the GPU proof kit's stages (benchmarks/gpu_proof.py), its dry run, and `make gpu-wheels`.

    python benchmarks/gpu_proof.py env                          # device, bf16 peak, TE, versions (JSON line)
    python benchmarks/gpu_proof.py make-models --work DIR       # tiny + ~1.1B random HF LLaMA, tokenizer
    python benchmarks/gpu_proof.py parity --work DIR            # tiny logits: CUDA vs HF on CUDA vs CPU
    python benchmarks/gpu_proof.py gather-wheels --dest DIR     # the wheels a bare Python 3.12 GPU machine lacks

Only the standard library is imported at module level: the kit starts before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_PYTHON = "3.12"
# glibc 2.28 or older (pip does not expand a --platform to older manylinux tags itself)
TARGET_PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(28, 16, -1)] + ["manylinux2014_x86_64"]
MANIFEST = "manifest.txt"
# GPU_PROOF_ALLOW_CPU=1: a rehearsal of every stage on a CPU machine (small sizes; CUDA comparisons left out)
ALLOW_CPU = os.environ.get("GPU_PROOF_ALLOW_CPU") == "1"
# TinyLlama-1.1B's shape (HF config fields)
BIG = dict(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
# the prune stage's target: a valid TP=1 shape from BIG (6 heads per group, head dim kept)
PRUNE_TARGET = dict(hidden=1536, heads=24, ffn=4096)


# ------------------------------------------------------------------------------------------------ env
def env_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="gpu_proof.py env", description="device, bf16 peak, TE, versions")


def task_env(args: argparse.Namespace) -> int:
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available()}
    if out["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        out.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1))
    import megatron.core

    from megatron_prune.train.metrics import default_peak_tflops

    out.update(megatron_core=megatron.core.__version__, peak_bf16_tflops=default_peak_tflops())
    try:
        import transformer_engine

        out.update(te_ok=True, transformer_engine=getattr(transformer_engine, "__version__", "?"))
    except Exception as e:  # TE is optional: the TE stage is skipped, with the reason
        out.update(te_ok=False, transformer_engine=f"{type(e).__name__}: {e}"[:160])
    print(json.dumps(out))
    return 0 if out["cuda_available"] or ALLOW_CPU else 1


# ------------------------------------------------------------------------------------------------ models
def big_config(layers: int) -> dict:
    return dict(BIG, num_hidden_layers=layers, model_type="llama", architectures=["LlamaForCausalLM"],
                hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                dtype="bfloat16", bos_token_id=1, eos_token_id=2)


def write_big_hf(out: Path, cfg: dict) -> int:
    """Random bf16 weights (std 0.02, norms 1: trainable in bf16) as sharded safetensors; returns parameters."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from common import layer_tensors
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    v, h = cfg["vocab_size"], cfg["hidden_size"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    groups = [{"model.embed_tokens.weight": (v, h)}]
    groups += [layer_tensors(cfg, i) for i in range(cfg["num_hidden_layers"])]
    groups.append({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    weight_map, params = {}, 0
    gen = torch.Generator(device=device).manual_seed(0)
    for n, group in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.ones(s, dtype=torch.bfloat16) if len(s) == 1 else
                       (torch.randn(s, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu())
                   for k, s in group.items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        params += sum(t.numel() for t in tensors.values())
        weight_map.update({k: name for k in group})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": params * 2},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return params


def models_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_proof.py make-models", description="tiny + big random HF LLaMA")
    p.add_argument("--work", required=True)
    p.add_argument("--layers", type=int, default=22)
    return p


def task_make_models(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.helpers import VARIANTS, make_hf_model, save_tiny_tokenizer

    work = Path(args.work)
    for d in ("tiny-hf", "big-hf", "tiny-mg", "big-mg", "big-pruned", "kd-out", "data"):
        shutil.rmtree(work / d, ignore_errors=True)  # our own scratch outputs of an earlier run
    tiny = make_hf_model(work / "tiny-hf", **VARIANTS["gqa"])
    save_tiny_tokenizer(work / "big-hf")  # 300 tokens: the data for training; the model keeps 32000
    params = write_big_hf(work / "big-hf", big_config(args.layers))
    print(json.dumps({"tiny_params": sum(t.numel() for t in tiny.parameters()), "big_params": params,
                      "big_layers": args.layers}))
    return 0


# ------------------------------------------------------------------------------------------------ parity
def parity_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_proof.py parity",
                                description="tiny model: megatron-core on CUDA vs HF on CUDA vs CPU (fp32)")
    p.add_argument("--work", required=True)
    p.add_argument("--tol", type=float, default=1e-4)
    return p


def task_parity(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import LlamaForCausalLM

    from megatron_prune.testing import run_distributed
    from tests.helpers import random_tokens

    work = Path(args.work)
    hf = LlamaForCausalLM.from_pretrained(work / "tiny-hf", dtype=torch.float32).eval()
    tokens = random_tokens(hf.config.vocab_size, batch=2, seq=65)
    case = {"cases": [{"name": "tiny", "ckpt": str(work / "tiny-mg"), "tp": 1, "pp": 1, "tokens": tokens.tolist()}]}

    def ours(env: dict) -> torch.Tensor:  # megatron-core in its own process (CUDA hidden: the CPU path)
        return run_distributed(1, "tests.dist.cases:logits", case, env=env)[0]["tiny"]["logits"].float().cpu()

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a - b).abs().max().item()

    with torch.no_grad():
        logits = {"hf_cpu": hf(tokens[:, :-1]).logits, "ours_cpu": ours({"CUDA_VISIBLE_DEVICES": ""})}
        if torch.cuda.is_available() or not ALLOW_CPU:
            logits["hf_cuda"] = hf.cuda()(tokens[:, :-1].cuda()).logits.cpu()
            logits["ours_cuda"] = ours({})
    pairs = [("ours_cuda", "hf_cuda"), ("ours_cuda", "ours_cpu"), ("ours_cpu", "hf_cpu"), ("hf_cuda", "hf_cpu")]
    out = {f"{a}_vs_{b}": diff(logits[a], logits[b]) for a, b in pairs if a in logits and b in logits}
    out["pass"] = all(v <= args.tol for k, v in out.items() if k.startswith("ours"))
    out.update(tolerance=args.tol, logits_shape=list(logits["ours_cpu"].shape))
    print(json.dumps(out))
    return 0 if out["pass"] else 1


# ------------------------------------------------------------------------------------------------ wheels
def bundled_with_torch(name: str) -> bool:
    """Distributions that come with the preinstalled CUDA torch (never gathered: GBs, and the machine has them)."""
    n = name.lower().replace("_", "-")
    return n == "torch" or n == "triton" or n.startswith(("nvidia-", "cuda-"))


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def wheels_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_proof.py gather-wheels",
                                description="our package + its non-torch dependencies as Python 3.12 wheels")
    p.add_argument("--dest", default=str(ROOT / "benchmarks" / "gpu_wheels"))
    p.add_argument("--python-version", default=TARGET_PYTHON)
    p.add_argument("--platform", action="append", help=f"wheel platform tag(s) (default: {TARGET_PLATFORMS[0]} "
                   f"and older manylinux)")
    return p


def task_gather_wheels(args: argparse.Namespace) -> int:
    dest = Path(args.dest)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent if dest.parent.is_dir() else None))
    target = ["--python-version", args.python_version, "--only-binary=:all:"]
    for plat in args.platform or TARGET_PLATFORMS:
        target += ["--platform", plat]
    try:
        _gather(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    wheels = sorted(w.name for w in tmp.glob("*.whl"))
    (tmp / MANIFEST).write_text("\n".join(wheels) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    size = sum(f.stat().st_size for f in dest.iterdir())
    print(f"wrote {dest}: {len(wheels)} wheels, {size / 2**20:.1f} MiB (manifest: {dest / MANIFEST})")
    return 0


def _gather(tmp: Path, target: list[str]) -> None:
    """Into `tmp`: our wheel, then every dependency the GPU machine's resolution needs except the torch bundle."""
    _pip("wheel", "-q", "--no-deps", "-w", str(tmp), str(ROOT))
    ours = next(tmp.glob("megatron_prune-*.whl"))
    # resolve as the GPU machine would (metadata only), then download all but the torch bundle
    _pip("install", "-q", "--dry-run", "--ignore-installed", "--report", str(tmp / "report.json"),
         "--target", str(tmp / "_resolve"), *target, str(ours))
    report = json.loads((tmp / "report.json").read_text())
    pins = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report["install"]
                  if not bundled_with_torch(i["metadata"]["name"]) and i["metadata"]["name"] != "megatron_prune")
    _pip("download", "-q", "--no-deps", "-d", str(tmp), *target, *pins)
    shutil.rmtree(tmp / "_resolve", ignore_errors=True)
    (tmp / "report.json").unlink()


def check_wheels(folder: Path) -> list[str]:
    """Problems with a `make gpu-wheels` folder: missing files, wheels a Python 3.12 x86_64 Linux cannot use."""
    from packaging.utils import parse_wheel_filename

    manifest = folder / MANIFEST
    if not manifest.is_file():
        return [f"{manifest}: missing (rerun `make gpu-wheels`)"]
    names = [n for n in manifest.read_text().split() if n]
    problems = [f"{folder / n}: listed in {MANIFEST} but missing (rerun `make gpu-wheels`)"
                for n in names if not (folder / n).is_file()]
    for required in ("megatron_prune", "megatron_core", "transformers"):
        if not any(n.startswith(required + "-") for n in names):
            problems.append(f"{manifest}: no {required} wheel (rerun `make gpu-wheels`)")
    for n in names:
        tags = parse_wheel_filename(n)[3]
        if not any(_usable(t) for t in tags):
            problems.append(f"{folder / n}: not installable on CPython {TARGET_PYTHON} / Linux x86_64")
    return problems


def _usable(tag) -> bool:
    minor = int(tag.interpreter[3:]) if tag.interpreter.startswith("cp3") else None  # cp38 -> 8 (not a string order)
    py_ok = tag.interpreter in ("py3", "cp312") or (tag.abi == "abi3" and minor is not None and minor <= 12)
    return py_ok and (tag.platform == "any" or (tag.platform.startswith("manylinux") and
                                                tag.platform.endswith("x86_64")))


# ------------------------------------------------------------------------------------------------ dry run
TASKS = {"env": (env_parser, task_env), "make-models": (models_parser, task_make_models),
         "parity": (parity_parser, task_parity), "gather-wheels": (wheels_parser, task_gather_wheels)}


def run_task(name: str, argv: list[str]) -> int:
    parser, body = TASKS[name]
    return body(parser().parse_args(argv))


def check_command(argv: list[str]) -> str | None:
    """None if a stage's command line is accepted at argument-parsing level, else why not."""
    if "megatron_prune" in argv and argv[argv.index("megatron_prune") - 1] == "-m":
        return _check_cli(argv[argv.index("megatron_prune") + 1:])
    if len(argv) > 2 and argv[1].endswith("gpu_proof.py"):
        if argv[2] not in TASKS:
            return f"unknown task {argv[2]!r}"
        try:
            TASKS[argv[2]][0]().parse_args(argv[3:])
        except SystemExit as e:
            return f"{argv[2]}: arguments rejected (exit {e.code})"
        return None
    if argv[1:5] == ["-I", "-m", "pip", "install"]:
        return None  # what it installs is covered by the wheels check
    return f"no parse check for {shlex.join(argv[:3])}"


def _check_cli(args: list[str]) -> str | None:
    from megatron_prune.cli.commands import SUBCOMMANDS, make_parser

    for words in (2, 1):
        name = " ".join(args[:words])
        if name in SUBCOMMANDS:
            module, parser = make_parser(name)  # the CLI's own parser: no abbreviations, its exit code 2
            try:
                ns = parser.parse_args(args[words:])
                vars(ns).pop("verbose")
                if name in ("train", "prune"):
                    module.build_config(ns)  # the settings' own validation (no files are read)
            except SystemExit as e:
                return f"{name}: arguments rejected (exit {e.code})"
            except Exception as e:
                return f"{name}: {type(e).__name__}: {e}"
            return None
    return f"unknown subcommand {' '.join(args[:2])!r}"


def check_prune_target(layers: int) -> str | None:
    """The prune stage's target sizes must be reachable from the big shape at TP=1."""
    from megatron_prune.config.shape import LlamaShape
    from megatron_prune.prune.select import PruneTarget

    try:
        PruneTarget(hidden_size=PRUNE_TARGET["hidden"], num_attention_heads=PRUNE_TARGET["heads"],
                    ffn_hidden_size=PRUNE_TARGET["ffn"], num_layers=max(1, layers * 3 // 4)
                    ).resolve(LlamaShape.from_hf_config(big_config(layers)), tp=1)
    except Exception as e:
        return f"target not reachable: {e}"
    return None


def dry_run(opts: argparse.Namespace, stages: list) -> int:
    """CPU check before taking the kit to a GPU: wheels (when the folder exists) and every stage's arguments."""
    problems = []
    wheels = Path(opts.wheels)
    if wheels.is_dir():
        found = check_wheels(wheels)
        problems += found
        listed = len((wheels / MANIFEST).read_text().split()) if (wheels / MANIFEST).is_file() else 0
        print(f"wheels: {wheels}: {listed} listed, " + ("all present" if not found else f"{len(found)} problem(s)"))
        for p in found:
            print(f"  {p}")
    else:
        print(f"wheels: {wheels} absent: run `make gpu-wheels` before taking the kit to a GPU machine")
    for st in stages:
        why = check_command(st.argv)
        if why is None and st.name == "prune":
            why = check_prune_target(opts.layers or BIG["num_hidden_layers"])
        print(f"stage {st.name:<13} {'arguments ok' if why is None else 'FAILED: ' + why}")
        problems += [f"stage {st.name}: {why}"] if why else []
    print(f"dry run: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1
