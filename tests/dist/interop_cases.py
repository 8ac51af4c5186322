"""Run under megatron_prune.testing.run_distributed: a checkpoint made the way Megatron-LM makes one."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def _hf_to_mcore_tp1(hf: dict, cfg: dict) -> dict:
    """HF LLaMA tensors -> megatron-core GPTModel keys at TP=1 (local spec), written out independently here:
    qkv interleaved per query group [q heads of the group; k; v], fc1 = [gate; up]."""
    heads, groups, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    per = heads // groups
    sd = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
          "decoder.final_layernorm.weight": hf["model.norm.weight"], "output_layer.weight": hf["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q, k, v = (hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        qkv = [torch.cat([q[g * per * d:(g + 1) * per * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]])
               for g in range(groups)]
        m = f"decoder.layers.{i}."
        fc1 = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        sd.update({m + "input_layernorm.weight": hf[p + "input_layernorm.weight"],
                   m + "self_attention.linear_qkv.weight": torch.cat(qkv),
                   m + "self_attention.linear_proj.weight": hf[p + "self_attn.o_proj.weight"],
                   m + "pre_mlp_layernorm.weight": hf[p + "post_attention_layernorm.weight"],
                   m + "mlp.linear_fc1.weight": fc1,
                   m + "mlp.linear_fc2.weight": hf[p + "mlp.down_proj.weight"]})
    return sd


def _megatron_lm_args(cfg: dict, rope: dict) -> argparse.Namespace:
    """args as current Megatron-LM saves them: its field names (layernorm_epsilon, no norm_epsilon) and
    megatron-core enums."""
    from megatron.core.enums import Fp8Recipe
    from megatron.core.transformer.enums import AttnBackend, ModelType

    return argparse.Namespace(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=cfg["num_attention_heads"], group_query_attention=True,
        num_query_groups=cfg["num_key_value_heads"], kv_channels=cfg["head_dim"], seq_length=128,
        max_position_embeddings=cfg["max_position_embeddings"], padded_vocab_size=cfg["vocab_size"], vocab_size=None,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        normalization="RMSNorm", layernorm_epsilon=cfg["rms_norm_eps"], swiglu=True, add_bias_linear=False,
        add_qkv_bias=False, position_embedding_type="rope", rotary_base=int(rope["rope_theta"]), rotary_percent=1.0,
        rotary_interleaved=False, use_rope_scaling=True, rope_scaling_factor=rope["factor"],
        untie_embeddings_and_output_weights=True, bf16=False, fp16=False, params_dtype=torch.float32,
        transformer_impl="local", sequence_parallel=False, attention_backend=AttnBackend.auto,
        model_type=ModelType.encoder_or_decoder, fp8_recipe=Fp8Recipe.delayed, ckpt_format="torch")


def save_like_megatron_lm(payload: dict) -> list[str]:
    """megatron-core's own GPTModel holding the HF weights, saved as Megatron-LM's legacy torch saver lays an
    iteration-0 save out: iter_0000000/mp_rank_00/model_optim_rng.pt and tracker "0". Returns missing keys."""
    import json

    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from safetensors.torch import load_file

    from megatron_prune.model.dist import init_model_parallel

    init_model_parallel(1, 1)
    hf_dir = Path(payload["hf"])
    cfg = json.loads((hf_dir / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {**cfg["rope_scaling"], "rope_theta": cfg["rope_theta"]}
    config = TransformerConfig(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=cfg["num_attention_heads"], num_query_groups=cfg["num_key_value_heads"],
        kv_channels=cfg["head_dim"], normalization="RMSNorm", layernorm_epsilon=cfg["rms_norm_eps"],
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=True, perform_initialization=False)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=cfg["vocab_size"],
                     max_sequence_length=cfg["max_position_embeddings"], position_embedding_type="rope",
                     rotary_base=int(rope["rope_theta"]), rope_scaling=True, rope_scaling_factor=rope["factor"],
                     share_embeddings_and_output_weights=False)
    result = model.load_state_dict(_hf_to_mcore_tp1(load_file(hf_dir / "model.safetensors"), cfg), strict=False)
    root = Path(payload["save"])
    path = root / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    torch.save({"args": _megatron_lm_args(cfg, rope), "checkpoint_version": 3.0, "iteration": 0,
                "model": model.state_dict_for_save_checkpoint(), "num_floating_point_operations_so_far": 0}, path)
    (root / "latest_checkpointed_iteration.txt").write_text("0")
    return list(result.missing_keys)


# ----------------------------------------------------------------------------- torch_dist (one launch, 2 ranks)
PADDED = 1024  # the HF test model's 1000 rows padded as Megatron-LM pads them (128 x TP)


def _gpt_model(cfg: dict, rope: dict | None, tp: int):
    """megatron-core's own GPTModel (local spec) of the HF config at TP=`tp` (x DP = world / tp), no weights."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_prune.model.dist import init_model_parallel

    init_model_parallel(tp, 1)
    config = TransformerConfig(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=cfg["num_attention_heads"], num_query_groups=cfg["num_key_value_heads"],
        kv_channels=cfg["head_dim"], normalization="RMSNorm", layernorm_epsilon=cfg["rms_norm_eps"],
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, use_cpu_initialization=True, perform_initialization=False)
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    return GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=PADDED,
                    max_sequence_length=cfg["max_position_embeddings"], position_embedding_type="rope",
                    rotary_base=int(theta), share_embeddings_and_output_weights=False)


def _full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import tensor_parallel

    from megatron_prune.model.forward import causal_mask

    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        out = model.eval()(tokens, pos, causal_mask(tokens.shape[1]))
    return tensor_parallel.gather_from_tensor_model_parallel_region(out)


def _mcore_load(model, ckpt_dir: Path) -> None:
    """megatron-core's own dist_checkpointing.load into the model (its sharded_state_dict), strict."""
    from megatron.core import dist_checkpointing

    from megatron_prune.checkpoint.dist_ckpt import megatron_io_context

    with megatron_io_context():
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt_dir))
    model.load_state_dict(state["model"])


def _mcore_save(model, ckpt_dir: Path, common: dict) -> None:
    from megatron.core import dist_checkpointing

    from megatron_prune.checkpoint.dist_ckpt import _fork_results_queue, megatron_io_context

    if torch.distributed.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    with megatron_io_context():
        _fork_results_queue()
        dist_checkpointing.save({**common, "model": model.sharded_state_dict()}, str(ckpt_dir))


def torch_dist_interop(payload: dict) -> dict:
    """(1) megatron-core loads our HF -> torch_dist conversion into its GPTModel at TP=1 and TP=2 (logits back);
    (2) megatron-core writes a torch_dist checkpoint the way Megatron-LM does (iter dir, args in the common state,
    no megatron_prune.json) at TP=2, from its own TP=1 model holding the HF weights; (3) prune (random) each given
    checkpoint on the two ranks."""
    import json

    from safetensors.torch import load_file

    hf_dir = Path(payload["hf"])
    cfg = json.loads((hf_dir / "config.json").read_text())
    tokens = torch.tensor(payload["tokens"])
    out = {}
    for tp in (1, 2):
        model = _gpt_model(cfg, None, tp)
        _mcore_load(model, Path(payload["ours"]) / "release")
        out[f"ours_tp{tp}"] = _full_logits(model, tokens)
    # (2): TP=1 model with the HF weights (independent mapping) -> saved -> loaded by megatron-core at TP=2 -> saved
    model = _gpt_model(cfg, None, 1)
    sd = _hf_to_mcore_tp1(load_file(hf_dir / "model.safetensors"), cfg)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):  # Megatron-LM's zero padding rows
        sd[key] = torch.cat([sd[key], sd[key].new_zeros(PADDED - sd[key].shape[0], sd[key].shape[1])])
    missing = model.load_state_dict(sd, strict=False)
    assert all(k.endswith("_extra_state") for k in missing.missing_keys), missing
    root = Path(payload["mlm"])
    args = _megatron_lm_args(cfg, {"rope_theta": 10000, "factor": 8.0})  # with megatron-core enums
    args.use_rope_scaling, args.tensor_model_parallel_size, args.ckpt_format = False, 2, "torch_dist"
    args.padded_vocab_size = PADDED
    common = {"args": args, "checkpoint_version": 3.0, "iteration": 3, "num_floating_point_operations_so_far": 0}
    _mcore_save(model, root / "staging_tp1", {"iteration": 3})  # megatron-core's own loader reads it back
    model = _gpt_model(cfg, None, 2)
    _mcore_load(model, root / "staging_tp1")
    _mcore_save(model, root / "iter_0000003", common)
    if torch.distributed.get_rank() == 0:
        import shutil

        shutil.rmtree(root / "staging_tp1")
        (root / "latest_checkpointed_iteration.txt").write_text("3")
    torch.distributed.barrier()
    out["mlm_tp2_logits"] = _full_logits(model, tokens)
    # (3)
    from megatron_prune.prune.run import PruneConfig, prune_checkpoint
    from megatron_prune.prune.select import PruneTarget

    for load, save, fmt in payload["prune"]:
        target = PruneTarget(hidden_size=48, ffn_hidden_size=64, drop_layers=(1,))
        prune_checkpoint(PruneConfig(load=load, save=save, target=target, progress=False, ckpt_format=fmt))
    return out
