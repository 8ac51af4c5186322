"""Uneven (global-mode-like) checkpoints made by test code, independent of the pruner and the resharder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_prune.checkpoint import megatron_io as mio

# GQA model: heads 8, groups 4, head_dim 16, hidden 96, ffn 96; at TP=2 each rank holds 2 groups, 48 channels.
UNEVEN_MODEL = dict(num_attention_heads=8, num_key_value_heads=4, vocab_size=1000, intermediate_size=96,
                    hidden_size=96)  # transformers 5 wants hidden % heads == 0 also after the cut (6 heads)
HPG, D, DROP_GROUP, DROP_FFN = 2, 16, 1, list(range(48, 56))  # rank 0 loses its group 1; rank 1 channels 0-7


def make_uneven(tp2_root: Path, out: Path) -> None:
    """Copy a TP=2 checkpoint and cut rank 0's second query group and rank 1's first 8 FFN channels."""
    meta = mio.read_meta(tp2_root)
    sds = [dict(mio.load_rank(tp2_root, r, 0, meta)["model"]) for r in range(2)]
    per_group = (HPG + 2) * D
    for i in range(meta.shape.num_layers):
        p = f"decoder.layers.{i}."
        qkv, proj = sds[0][p + "self_attention.linear_qkv.weight"], sds[0][p + "self_attention.linear_proj.weight"]
        sds[0][p + "self_attention.linear_qkv.weight"] = torch.cat([qkv[:per_group], qkv[2 * per_group:]])
        sds[0][p + "self_attention.linear_proj.weight"] = torch.cat([proj[:, :HPG * D], proj[:, 2 * HPG * D:]], 1)
        fc1 = sds[1][p + "mlp.linear_fc1.weight"]
        gate, up = fc1.chunk(2)
        sds[1][p + "mlp.linear_fc1.weight"] = torch.cat([gate[8:], up[8:]])
        sds[1][p + "mlp.linear_fc2.weight"] = sds[1][p + "mlp.linear_fc2.weight"][:, 8:]
    shape = meta.shape.replace(num_query_groups=3, num_attention_heads=6, ffn_hidden_size=88)
    L = shape.num_layers
    new = meta.replace(shape=shape, rank_sizes={"groups": [[1, 2]] * L, "ffn": [[48, 40]] * L})
    args = mio.megatron_args(new)
    for r in range(2):
        mio.save_rank(out, "release", r, 0, 1, mio.rank_state({k: v.clone() if v is not None else None
                                                               for k, v in sds[r].items()}, args, 0))
    for f in tp2_root.iterdir():
        if f.is_file() and f.name not in (mio.TRACKER, mio.META):
            (out / f.name).write_bytes(f.read_bytes())
    mio.write_meta(out, new)
    mio.write_tracker(out, "release")


def expected_uneven_hf(hf_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """The same cut applied to the HF weights: global group 1 (q heads 2-3, k/v 1) and FFN channels 48-55."""
    sd = load_file(hf_dir / "model.safetensors")
    cfg = json.loads((hf_dir / "config.json").read_text())
    g = DROP_GROUP
    keep_q = [r for r in range(8 * D) if not (g * HPG * D <= r < (g + 1) * HPG * D)]
    keep_kv = [r for r in range(4 * D) if not (g * D <= r < (g + 1) * D)]
    keep_f = [c for c in range(96) if c not in DROP_FFN]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = sd[p + "self_attn.q_proj.weight"][keep_q]
        sd[p + "self_attn.k_proj.weight"] = sd[p + "self_attn.k_proj.weight"][keep_kv]
        sd[p + "self_attn.v_proj.weight"] = sd[p + "self_attn.v_proj.weight"][keep_kv]
        sd[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][:, keep_q]
        for k in ("gate_proj", "up_proj"):
            sd[p + f"mlp.{k}.weight"] = sd[p + f"mlp.{k}.weight"][keep_f]
        sd[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][:, keep_f]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    cfg.update(num_attention_heads=6, num_key_value_heads=3, intermediate_size=88)
    (out / "config.json").write_text(json.dumps(cfg))
    return sd
