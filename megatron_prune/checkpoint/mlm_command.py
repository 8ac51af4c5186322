"""The Megatron-LM `pretrain_gpt.py` flags that load one of our checkpoints as the model it is.

Megatron-LM reads the model shape back from a checkpoint only with --use-checkpoint-args, and even then not
everything: its norm epsilon (without --norm-epsilon its logits differ from HF), --transformer-impl (the default
transformer_engine expects fused-norm key names; on local-name shards it retries a non-strict load that leaves
the norms unloaded; local also needs --no-persist-layer-norm), the tokenizer, llama3 rope scaling and the
parallel sizes must be given. So every value is printed, from megatron_prune.json and rank 0's args.
Flag spellings: Megatron-LM's megatron/training/arguments.py (TransformerConfig fields become flags there too:
layernorm_epsilon is `--norm-epsilon`, add_bias_linear False is `--disable-bias-linear`).
"""

from __future__ import annotations

import shlex
import struct
from pathlib import Path

from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.hf_io import CheckpointError

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_flags(root: Path, tokenizer: str | Path | None = None) -> list[list[str]]:
    """An HF tokenizer directory -> HuggingFaceTokenizer; a SentencePiece .model alone -> Llama2Tokenizer."""
    path = Path(tokenizer).resolve() if tokenizer else root
    if path.is_dir() and any((path / f).is_file() for f in HF_TOKENIZER_FILES):
        return [["--tokenizer-type", "HuggingFaceTokenizer"], ["--tokenizer-model", str(path)]]
    model = path / "tokenizer.model" if path.is_dir() else path
    if model.is_file() and model.suffix == ".model":
        return [["--tokenizer-type", "Llama2Tokenizer"], ["--tokenizer-model", str(model)]]
    raise CheckpointError(f"{path}: no tokenizer (tokenizer.json / tokenizer_config.json / tokenizer.model); "
                          "pass --tokenizer DIR_OR_FILE")


def _rotary_base(theta: float, root: Path) -> str:
    if float(theta) != int(theta):
        raise CheckpointError(f"{root}: rope_theta {theta} is not an integer; Megatron-LM's --rotary-base "
                              "takes an integer")
    return str(int(theta))


def _float32_text(x: float) -> str:
    """The shortest decimal that is the same float32 as `x`: a checkpoint's float32 epsilon (9.999999747378752e-06)
    prints as the 1e-05 its config said; both sides compute the norm in float32."""
    as32 = struct.unpack("f", struct.pack("f", float(x)))[0]
    return next(t for t in (f"{float(x):.{p}g}" for p in range(1, 18))
                if struct.unpack("f", struct.pack("f", float(t)))[0] == as32)


def pretrain_gpt_flags(load: str | Path, tokenizer: str | Path | None = None) -> list[list[str]]:
    """[[flag, value...], ...] for Megatron-LM's pretrain_gpt.py to load `load` exactly."""
    from megatron_prune.model.build import check_rope_supported

    root = Path(load).resolve()
    meta = mio.read_meta(root)
    s = meta.shape
    if meta.rank_sizes is not None:
        raise CheckpointError(f"{root}: uneven shards (global-mode pruning), which Megatron-LM cannot load; "
                              f"even them out first: python -m megatron_prune reshard --load {root} --save DIR "
                              f"--tp {meta.tp}")
    try:
        check_rope_supported(s)
    except ValueError as e:
        raise CheckpointError(f"{root}: Megatron-LM cannot express this rope scaling: {e}") from None
    args = mio.load_rank(root, 0, 0, meta)["args"]
    seq_length = getattr(args, "seq_length", None) or min(s.max_position_embeddings, 4096)
    flags = [["--tensor-model-parallel-size", str(meta.tp)], ["--pipeline-model-parallel-size", str(meta.pp)],
             ["--num-layers", str(s.num_layers)], ["--hidden-size", str(s.hidden_size)],
             ["--ffn-hidden-size", str(s.ffn_hidden_size)], ["--num-attention-heads", str(s.num_attention_heads)]]
    if s.num_query_groups != s.num_attention_heads:
        flags += [["--group-query-attention"], ["--num-query-groups", str(s.num_query_groups)]]
    flags += [["--kv-channels", str(s.kv_channels)], ["--seq-length", str(seq_length)],
              ["--max-position-embeddings", str(s.max_position_embeddings)],
              ["--position-embedding-type", "rope"], ["--rotary-base", _rotary_base(s.rope_theta, root)],
              ["--rotary-percent", "1.0"]]
    if s.rope_scaling:
        flags += [["--use-rope-scaling"], ["--rope-scaling-factor", repr(float(s.rope_scaling.factor))]]
    flags += [["--normalization", "RMSNorm"], ["--norm-epsilon", _float32_text(s.norm_eps)], ["--swiglu"],
              ["--disable-bias-linear"], ["--attention-dropout", "0.0"], ["--hidden-dropout", "0.0"]]
    if not s.tie_word_embeddings:
        flags.append(["--untie-embeddings-and-output-weights"])
    flags.append(["--make-vocab-size-divisible-by", str(meta.make_vocab_size_divisible_by)])
    flags += {"bfloat16": [["--bf16"]], "float16": [["--fp16"]], "float32": []}[s.dtype]
    flags += ([["--transformer-impl", "transformer_engine"]] if meta.te_names
              else [["--transformer-impl", "local"], ["--no-persist-layer-norm"]])
    flags += tokenizer_flags(root, tokenizer)
    flags += [["--ckpt-format", "torch"], ["--load", str(root)], ["--use-checkpoint-args"], ["--no-load-optim"],
              ["--no-load-rng"]]
    return flags


def tokenizer_padding_problem(load: str | Path, tokenizer_model: str) -> str | None:
    """Megatron-LM sizes the embedding from the tokenizer (its size padded to a multiple of
    make_vocab_size_divisible_by x TP); a message when that differs from the checkpoint's, else None."""
    from megatron_prune.data.tokenizers import load_tokenizer

    meta = mio.read_meta(load)
    n = load_tokenizer(tokenizer_model).vocab_size
    multiple = meta.make_vocab_size_divisible_by * meta.tp
    padded = -(-n // multiple) * multiple
    if padded == meta.padded_vocab_size:
        return None
    return (f"the tokenizer {tokenizer_model} has {n} tokens, which Megatron-LM pads to {padded}, but the "
            f"checkpoint's embedding has {meta.padded_vocab_size} rows: Megatron-LM will refuse to load it")


def format_flags(flags: list[list[str]], one_line: bool = False) -> str:
    """Shell-quoted; one flag per line with continuation backslashes (or all on one line)."""
    parts = [" ".join(shlex.quote(x) for x in f) for f in flags]
    return " ".join(parts) if one_line else " \\\n".join(parts)
