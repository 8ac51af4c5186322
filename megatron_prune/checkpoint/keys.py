"""Literal key maps between HF LlamaForCausalLM and megatron-core GPTModel (local and TE spellings).

`{}` is the layer index: global (0-based) on the HF side, stage-local on the Megatron side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TensorMap:
    mcore: str                 # megatron-core local-spec key
    hf: tuple[str, ...]        # HF keys the tensor is built from, in layout order
    kind: str                  # layout kind (checkpoint.layout)
    te: str | None = None      # Transformer Engine spelling, where it differs


LAYER_MAPS: tuple[TensorMap, ...] = (
    TensorMap("decoder.layers.{}.input_layernorm.weight", ("model.layers.{}.input_layernorm.weight",),
              "replicated", te="decoder.layers.{}.self_attention.linear_qkv.layer_norm_weight"),
    TensorMap("decoder.layers.{}.self_attention.linear_qkv.weight",
              ("model.layers.{}.self_attn.q_proj.weight", "model.layers.{}.self_attn.k_proj.weight",
               "model.layers.{}.self_attn.v_proj.weight"), "qkv"),
    TensorMap("decoder.layers.{}.self_attention.linear_proj.weight", ("model.layers.{}.self_attn.o_proj.weight",),
              "row"),
    TensorMap("decoder.layers.{}.pre_mlp_layernorm.weight", ("model.layers.{}.post_attention_layernorm.weight",),
              "replicated", te="decoder.layers.{}.mlp.linear_fc1.layer_norm_weight"),
    TensorMap("decoder.layers.{}.mlp.linear_fc1.weight",
              ("model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.up_proj.weight"), "fc1"),
    TensorMap("decoder.layers.{}.mlp.linear_fc2.weight", ("model.layers.{}.mlp.down_proj.weight",), "row"),
)
# The same maps by name, for code that slices one tensor of a layer (the pruner, importance scores).
INPUT_NORM, QKV, PROJ, PRE_MLP_NORM, FC1, FC2 = LAYER_MAPS
EMBEDDING = TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")
FINAL_NORM = TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated")
OUTPUT = TensorMap("output_layer.weight", ("lm_head.weight",), "vocab")

# megatron-core's linears carry `_extra_state` (None in the local spec); Megatron-LM's strict load expects them.
LAYER_EXTRA_STATE = tuple(f"decoder.layers.{{}}.{m}._extra_state" for m in (
    "self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2"))
OUTPUT_EXTRA_STATE = "output_layer._extra_state"

# HF keys that carry no weights we need.
HF_IGNORED = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)

_TE_RENAMES = tuple((m.mcore, m.te) for m in LAYER_MAPS if m.te)


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


_TO_TE = tuple((_template_regex(a), b) for a, b in _TE_RENAMES)
_TO_LOCAL = tuple((_template_regex(b), a) for a, b in _TE_RENAMES)


def _rename(sd: dict, rules) -> dict:
    out = {}
    for key, value in sd.items():
        for pattern, template in rules:
            m = pattern.match(key)
            if m:
                key = template.format(m.group(1))
                break
        out[key] = value
    return out


def to_te_names(sd: dict) -> dict:
    """Local-spec keys -> Transformer Engine keys (norms fused into linear_qkv / linear_fc1)."""
    return _rename(sd, _TO_TE)


_LAYER_PREFIX = re.compile(r"^decoder\.layers\.\d+\.")


def dist_name(key: str) -> str:
    """The key of a local-spec (or TE) tensor in megatron-core's sharded state dict (torch_dist checkpoints): the
    TE spelling with the layer index dropped (layers are stacked along a leading axis there)."""
    (te,) = to_te_names({key: None})
    return _LAYER_PREFIX.sub("decoder.layers.", te)


def to_local_names(sd: dict) -> dict:
    """Transformer Engine keys -> local-spec keys; TE-only `core_attention._extra_state` entries are dropped."""
    sd = {k: v for k, v in sd.items() if not k.endswith("core_attention._extra_state")}
    return _rename(sd, _TO_LOCAL)


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> range:
    """Global indices of the layers held by pipeline stage `pp_rank` (even split)."""
    per = num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def stage_tensor_maps(num_layers: int, pp: int, pp_rank: int, tied: bool
                      ) -> list[tuple[str, tuple[str, ...], str]]:
    """(megatron key, HF keys, kind) for every tensor of one pipeline stage, in state-dict order."""
    out = []
    first, last = pp_rank == 0, pp_rank == pp - 1
    if first:
        out.append((EMBEDDING.mcore, EMBEDDING.hf, EMBEDDING.kind))
    for local, layer in enumerate(stage_layers(num_layers, pp, pp_rank)):
        for m in LAYER_MAPS:
            out.append((m.mcore.format(local), tuple(h.format(layer) for h in m.hf), m.kind))
    if last:
        out.append((FINAL_NORM.mcore, FINAL_NORM.hf, FINAL_NORM.kind))
        if not tied:
            out.append((OUTPUT.mcore, OUTPUT.hf, OUTPUT.kind))
        elif pp > 1:  # the last stage keeps its own copy of the tied embedding as the output weight
            out.append((OUTPUT.mcore, EMBEDDING.hf, OUTPUT.kind))
    return out


def stage_extra_state_keys(num_layers: int, pp: int, pp_rank: int) -> list[str]:
    keys = [t.format(i) for i in range(len(stage_layers(num_layers, pp, pp_rank))) for t in LAYER_EXTRA_STATE]
    if pp_rank == pp - 1:
        keys.append(OUTPUT_EXTRA_STATE)
    return keys


def hf_expected_keys(num_layers: int, tied: bool) -> list[str]:
    keys = list(EMBEDDING.hf)
    for layer in range(num_layers):
        for m in LAYER_MAPS:
            keys += [h.format(layer) for h in m.hf]
    keys += list(FINAL_NORM.hf)
    if not tied:
        keys += list(OUTPUT.hf)
    return keys


def is_ignored_hf_key(key: str) -> bool:
    return any(p.match(key) for p in HF_IGNORED)


def hf_expected_shapes(shape) -> dict[str, tuple[int, ...]]:
    """{HF key: shape} of every tensor of a LlamaForCausalLM of `shape` (a config.json's promise to its tensors)."""
    h, f, d, v = shape.hidden_size, shape.ffn_hidden_size, shape.kv_channels, shape.vocab_size
    q, kv = shape.num_attention_heads * d, shape.num_query_groups * d
    per_layer = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (f, h),
                 "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}
    out = {EMBEDDING.hf[0]: (v, h)}
    for layer in range(shape.num_layers):
        out.update({f"model.layers.{layer}.{k}": s for k, s in per_layer.items()})
    out[FINAL_NORM.hf[0]] = (h,)
    if not shape.tie_word_embeddings:
        out[OUTPUT.hf[0]] = (v, h)
    return out
