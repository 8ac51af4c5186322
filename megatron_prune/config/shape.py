"""LlamaShape: the frozen, validated shape of a LLaMA-family model, read from and written to HF config.json.

Both rope spellings are read: transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`).
Written configs use the 4.x spelling, which 5.x also reads, so exported directories load in both.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from megatron_prune.errors import UserError


DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32", "half": "float16"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30  # memory sizes (--target-memory-gb) are in GiB


class ShapeError(UserError, ValueError):
    """A model shape (or shape + parallel layout) that cannot work; the message names every factor."""


def torch_dtype(name: str):
    """The torch dtype of a dtype name (any spelling canonical_dtype accepts): the one table, DTYPES."""
    import torch

    return getattr(torch, canonical_dtype(name))


def canonical_dtype(name: str) -> str:
    name = str(name).replace("torch.", "")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ShapeError(f"unknown dtype {name!r} (expected one of {', '.join(DTYPES)} or bf16/fp16/fp32)")
    return name


# The shape fields the parameter count depends on (the arguments of count_params).
PARAM_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "vocab_size", "tie_word_embeddings")


def count_params(num_layers: int, hidden_size: int, ffn_hidden_size: int, num_attention_heads: int,
               num_query_groups: int, kv_channels: int, vocab_size: int, tie_word_embeddings: bool) -> int:
    """Parameters of an (unpadded) LLaMA: the one formula, for LlamaShape and for the budget search, which calls
    it without building a shape per candidate. Tied embeddings are counted once; no biases."""
    h, f, d = hidden_size, ffn_hidden_size, kv_channels
    qkv = (num_attention_heads + 2 * num_query_groups) * d * h
    attn = qkv + num_attention_heads * d * h          # + o_proj
    layer = attn + 3 * h * f + 2 * h                  # gate, up, down; two RMSNorms
    emb = vocab_size * h * (1 if tie_word_embeddings else 2)
    return num_layers * layer + emb + h               # + final norm


def inference_memory_bytes(shape: Any, seq_length: int, batch_size: int = 1, dtype: str = "bf16") -> int:
    """Bytes to serve `shape` (a LlamaShape, or anything with the PARAM_FIELDS attributes): its weights plus the
    KV cache of `batch_size` sequences of `seq_length` tokens, all in `dtype`. The one memory formula (the budget
    search's --target-memory-gb). Activations, framework overhead and Megatron's vocabulary padding are left out:
    they depend on the serving stack, and the weights + KV cache are what pruning changes."""
    nbytes = DTYPE_BYTES[canonical_dtype(dtype)]
    params = count_params(**{f: getattr(shape, f) for f in PARAM_FIELDS})
    kv = 2 * shape.num_layers * shape.num_query_groups * shape.kv_channels * seq_length * batch_size  # k and v
    return nbytes * (params + kv)


@dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1 style (`rope_type: llama3`) frequency scaling."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def to_hf(self) -> dict[str, Any]:
        return {"rope_type": "llama3", **dataclasses.asdict(self)}


# megatron-core hard-codes these llama3 rope-scaling parameters (rotary_pos_embedding._apply_scaling).
MCORE_LLAMA3 = (1.0, 4.0, 8192)


def check_rope_supported(shape: "LlamaShape") -> None:
    """megatron-core (and so Megatron-LM) builds llama3 rope scaling only with its fixed parameters."""
    rs = shape.rope_scaling
    if rs and (rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings) != MCORE_LLAMA3:
        raise ShapeError(
            "megatron-core supports llama3 rope scaling only with low_freq_factor=1, high_freq_factor=4, "
            f"original_max_position_embeddings=8192 (got {rs.low_freq_factor}, {rs.high_freq_factor}, "
            f"{rs.original_max_position_embeddings})")


@dataclass(frozen=True)
class LlamaShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "kv_channels", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ShapeError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ShapeError(
                f"heads {self.num_attention_heads} not divisible by query groups {self.num_query_groups} "
                f"(heads={self.num_attention_heads}, groups={self.num_query_groups})")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ShapeError(f"rope_theta and norm_eps must be positive (rope_theta={self.rope_theta}, "
                             f"norm_eps={self.norm_eps})")

    def check_parallel(self, tp: int, pp: int = 1, padded_vocab_size: int | None = None) -> None:
        """Raise ShapeError unless this shape can be split over `tp` tensor and `pp` pipeline ranks."""
        if tp < 1 or pp < 1:
            raise ShapeError(f"parallel sizes must be >= 1 (tp={tp}, pp={pp})")
        h, g, ffn = self.num_attention_heads, self.num_query_groups, self.ffn_hidden_size
        use = f"use TP {_either(self.tp_sizes(padded_vocab_size))}"
        if h % tp or g % tp:
            raise ShapeError(f"TP {tp} does not divide {h} heads / {g} query groups: {use}")
        if ffn % tp:
            raise ShapeError(f"TP {tp} does not divide the FFN size {ffn}: {use}")
        if padded_vocab_size is not None and padded_vocab_size % tp:
            raise ShapeError(f"TP {tp} does not divide the padded vocabulary {padded_vocab_size} "
                             f"(vocab {self.vocab_size}): {use}")
        if self.num_layers % pp:
            layers = self.num_layers
            raise ShapeError(f"PP {pp} does not divide {layers} layers: use PP {_either(_divisors(layers))}")

    def tp_sizes(self, padded_vocab_size: int | None = None) -> list[int]:
        """Every TP size this shape splits over (heads, query groups, FFN and a given padded vocabulary)."""
        return _divisors(math.gcd(self.num_attention_heads, self.num_query_groups, self.ffn_hidden_size,
                                  padded_vocab_size or 0))

    # ---------------------------------------------------------------- derived sizes
    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    def padded_vocab(self, divisible_by: int, tp: int) -> int:
        """Megatron-LM's rule: pad the vocabulary to a multiple of divisible_by * tp."""
        multiple = max(1, divisible_by) * tp
        return -(-self.vocab_size // multiple) * multiple

    def num_params(self) -> int:
        """Parameter count of the unpadded model (tied embeddings counted once)."""
        return count_params(**{f: getattr(self, f) for f in PARAM_FIELDS})

    def replace(self, **changes: Any) -> "LlamaShape":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dataclasses.asdict(self.rope_scaling) if self.rope_scaling else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaShape":
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "LlamaShape":
        return _shape_from_hf(cls, cfg)

    def to_hf_config(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """An HF LlamaConfig dict; `base` (the source model's config) keeps fields we do not model (bos/eos ids...)."""
        cfg = {k: v for k, v in (base or {}).items() if k not in ("rope_parameters", "torch_dtype")}
        cfg.update({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.kv_channels,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "dtype": self.dtype,
        })
        return cfg


def hf_config_warning(shape: LlamaShape) -> str | None:
    """transformers >= 5 LlamaConfig rejects hidden_size % num_attention_heads != 0 even with an explicit head_dim
    (its modelling code would be fine); megatron-core has no such rule. Say so before the user finds out."""
    if shape.hidden_size % shape.num_attention_heads:
        return (f"warning: hidden {shape.hidden_size} is not a multiple of heads {shape.num_attention_heads}: "
                f"transformers >= 5 refuses such a LlamaConfig, so the HF export will not load with from_pretrained "
                f"there (megatron-core and transformers 4.x are fine); pick a hidden size divisible by the heads")
    return None


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ShapeError(f"rope scaling type {kind!r} is not supported (supported: llama3, or none)")
    return theta, RopeScaling(
        factor=float(scaling.get("factor", 8.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)))


def unsupported_feature(cfg: dict[str, Any]) -> str | None:
    """The first field of an HF config that makes the model compute something our LLaMA does not, said as
    `FIELD VALUE is not supported (why)`; None when there is none. Such a field is refused, never dropped: what
    transformers' LlamaForCausalLM / MistralForCausalLM read from their config, beyond what LlamaShape models."""
    model_type = cfg.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
        return f"model_type {model_type!r} is not supported (not a LLaMA-family model; expected 'llama' or 'mistral')"
    if cfg.get("hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.get('hidden_act')!r} is not supported (LLaMA uses 'silu')"
    # MistralConfig's default window is 4096 when the key is absent; a window as long as the context never acts.
    window = cfg.get("sliding_window", 4096 if model_type == "mistral" else None)
    if window is not None and (model_type == "mistral" or cfg.get("use_sliding_window")) \
            and not (isinstance(window, int) and window >= cfg.get("max_position_embeddings", 4096 * 32)):
        return (f"sliding_window {window} is not supported (attention limited to the last {window} tokens; "
                f"Megatron's LLaMA attends to the whole context, so outputs would differ from position {window} on)")
    other = sorted(set(cfg.get("layer_types") or ()) - {"full_attention"})
    if other:
        return f"layer_types {other} is not supported (only full-attention layers)"
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            return f"{flag} {cfg[flag]} is not supported (LLaMA has no linear biases; they would be dropped)"
    for field in ("rope_scaling", "rope_parameters"):
        value = cfg.get(field) if isinstance(cfg.get(field), dict) else {}
        kind = value.get("rope_type", value.get("type", "default"))
        if kind not in ("default", "llama3"):
            return f"{field}: rope scaling type {kind!r} is not supported (supported: llama3, or none)"
    rotary = [d.get("partial_rotary_factor") for d in (cfg, cfg.get("rope_parameters") or {}, cfg.get("rope_scaling")
                                                      or {}) if isinstance(d, dict)]
    if any(f is not None and float(f) != 1.0 for f in rotary):
        return (f"partial_rotary_factor {next(f for f in rotary if f is not None and float(f) != 1.0)} is not "
                f"supported (rotary embedding on part of each head)")
    if cfg.get("quantization_config"):
        method = (cfg["quantization_config"] or {}).get("quant_method", "?")
        return f"quantization_config ({method}) is not supported (quantized weights; convert a full-precision model)"
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    if not cfg.get("head_dim") and isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and hidden % heads:
        return (f"head_dim (absent) is not supported with hidden_size {hidden} not divisible by num_attention_heads "
                f"{heads} (the config does not define the head size)")
    return None


def check_supported_features(cfg: dict[str, Any], where: str | Path = "config.json") -> None:
    """Raise ShapeError `WHERE: FIELD VALUE is not supported (...)` for the first unsupported_feature."""
    problem = unsupported_feature(cfg)
    if problem:
        raise ShapeError(f"{where}: {problem}")


def _shape_from_hf(cls: type[LlamaShape], cfg: dict[str, Any]) -> LlamaShape:
    check_supported_features(cfg)
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        theta, scaling = _rope_from_hf(cfg)
        return cls(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(cfg["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(cfg.get("num_key_value_heads") or heads),
            kv_channels=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype=canonical_dtype(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        )
    except KeyError as e:
        raise ShapeError(f"config.json lacks required field {e.args[0]!r}") from None


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ShapeError(f"{path}: missing config.json (not an HF model directory?)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShapeError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ShapeError(f"{path}: not an HF config (a JSON {type(cfg).__name__}, not an object)")
    check_supported_features(cfg, path)
    return cfg


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _either(values: list[int]) -> str:
    """[1, 3] -> '1 or 3'; [1, 2, 4] -> '1, 2 or 4'."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
