"""The Megatron-LM `pretrain_gpt.py` flags that load one of our checkpoints as the model it is.

Megatron-LM reads the model shape back from a checkpoint only with --use-checkpoint-args, and even then not
everything: its norm epsilon (without --norm-epsilon its logits differ from HF), --transformer-impl (the default
transformer_engine expects fused-norm key names; on local-name shards it retries a non-strict load that leaves
the norms unloaded; local also needs --no-persist-layer-norm), the tokenizer, llama3 rope scaling and the
parallel sizes must be given. So every value is printed, from megatron_prune.json and rank 0's args (or a
torch_dist checkpoint's common state). For a training checkpoint the flags say how Megatron-LM continues its
optimizer and scheduler (--use-checkpoint-opt_param-scheduler) and its RNG state, or the notes say why it cannot.
Flag spellings: Megatron-LM's megatron/training/arguments.py (TransformerConfig fields become flags there too:
layernorm_epsilon is `--norm-epsilon`, add_bias_linear False is `--disable-bias-linear`).
"""

from __future__ import annotations

import shlex
import struct
from pathlib import Path

import torch

from megatron_prune.checkpoint import dist_ckpt
from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.checkpoint.errors import CheckpointError
from megatron_prune.config.shape import ShapeError, check_rope_supported
from megatron_prune.errors import InputError

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


def pretrain_gpt_flags(load: str | Path, tokenizer: str | Path | None = None) -> tuple[list[list[str]], list[str]]:
    """([[flag, value...], ...], notes) for Megatron-LM's pretrain_gpt.py to load `load` exactly; the notes say
    what Megatron-LM cannot take over from it, and why."""
    root = Path(load).resolve()
    meta = mio.read_meta(root)
    if meta.rank_sizes is not None:
        raise CheckpointError(f"{root}: uneven shards (global-mode pruning), which Megatron-LM cannot load; "
                              f"even them out first: python -m megatron_prune reshard --load {root} --save DIR "
                              f"--tp {meta.tp}")
    ck = mio.open_checkpoint(root)
    meta = ck.meta
    s = meta.shape
    try:
        check_rope_supported(s)
    except ShapeError as e:
        raise CheckpointError(f"{root}: Megatron-LM cannot express this rope scaling: {e}") from None
    state = _rank0_state(ck)
    args = state.get("args")
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
    flags += [["--ckpt-format", ck.format], ["--load", str(root)], ["--use-checkpoint-args"]]
    state_flags, notes = _training_state_flags(ck, state)
    return flags + state_flags, notes


def _rank0_state(ck: mio.OpenCheckpoint) -> dict:
    """Rank 0's state without tensor data (legacy: its rank file on the meta device), or a torch_dist common state
    with rank 0's rng_state object."""
    if ck.format == "torch_dist":
        index = dist_ckpt.read_index(ck.folder)
        state = dist_ckpt.read_common(index)
        args = state.get("args")
        pp, tp = getattr(args, "pipeline_model_parallel_size", 1), getattr(args, "tensor_model_parallel_size", 1)
        rng = dist_ckpt.read_object(index, f"rng_state/shard_0.0_{pp}.{tp}")  # Megatron-LM's layout, rank 0's
        return {**state, "rng_state": rng} if rng is not None else state
    path = mio.rank_path(ck.root, ck.iteration, 0, 0, ck.meta.pp)
    return mio.load_rank_file(path, map_location="meta", mmap=False)


def _training_state_flags(ck: mio.OpenCheckpoint, state: dict) -> tuple[list[list[str]], list[str]]:
    """How Megatron-LM continues a training checkpoint's optimizer, scheduler and RNG state (or why it cannot)."""
    if state.get("optimizer") is None or state.get("opt_param_scheduler") is None:
        return [["--no-load-optim"], ["--no-load-rng"]], []  # weights only (converted, pruned, resharded)
    flags, notes = [], []
    dist_optimizer = bool(state.get("distributed_optimizer") or getattr(state.get("args"), "use_distributed_optimizer",
                                                                       False))
    if dist_optimizer and ck.format == "torch":
        flags.append(["--no-load-optim"])
        notes.append(f"{ck.root}: its distributed-optimizer state is saved per data-parallel rank, which Megatron-LM's "
                     f"legacy loader does not read: --no-load-optim starts a fresh optimizer (save training "
                     f"checkpoints with --ckpt-format torch_dist to continue it in Megatron-LM)")
    else:
        flags += [["--use-distributed-optimizer"]] if dist_optimizer else []
        flags.append(["--use-checkpoint-opt_param-scheduler"])  # the schedule (lr, warmup, decay) it was saved with
    if not _cuda_rng_state(state.get("rng_state")):
        flags.append(["--no-load-rng"])
        notes.append(f"{ck.root}: trained without CUDA, so its RNG state holds no CUDA generator state for Megatron-LM "
                     f"to restore: --no-load-rng")
    return flags, notes


def _cuda_rng_state(rng) -> bool:
    """Megatron-LM's RNG layout ([{..., "cuda_rng_state": tensor, ...}] or its torch_dist ShardedObject) with a
    CUDA generator state in it."""
    entries = rng if isinstance(rng, list) else [rng]
    return bool(entries) and all(isinstance(e, dict) and isinstance(e.get("cuda_rng_state"), torch.Tensor)
                                 for e in entries)


def tokenizer_padding_problem(meta: mio.CheckpointMeta, tokens: int, tokenizer_model: str) -> str | None:
    """Megatron-LM sizes the embedding from the tokenizer (its `tokens`, padded as LlamaShape.padded_vocab pads);
    a message when that differs from the checkpoint's, else None."""
    padded = meta.shape.replace(vocab_size=tokens).padded_vocab(meta.make_vocab_size_divisible_by, meta.tp)
    if padded == meta.padded_vocab_size:
        return None
    return (f"the tokenizer {tokenizer_model} has {tokens} tokens, which Megatron-LM pads to {padded}, but the "
            f"checkpoint's embedding has {meta.padded_vocab_size} rows: Megatron-LM will refuse to load it")


def format_flags(flags: list[list[str]], one_line: bool = False) -> str:
    """Shell-quoted, one flag per line with continuation backslashes; or on one line for an unquoted `$(...)`, which
    splits words at whitespace whatever the quotes: a value that would not survive that is refused."""
    if one_line:
        for value in (x for f in flags for x in f):
            if shlex.quote(value) != value:
                raise InputError(f"{value!r} would be split or expanded by an unquoted $(...): --one-line cannot "
                                 f"print it; use the default output (shell-quoted, one flag per line) or --null "
                                 f"(NUL-separated, for xargs -0 or mapfile -d '')")
        return " ".join(x for f in flags for x in f)
    return " \\\n".join(" ".join(shlex.quote(x) for x in f) for f in flags)


def null_separated(flags: list[list[str]]) -> str:
    """Every word NUL-terminated, unquoted: exact for `xargs -0` and `mapfile -d ''`, whatever the paths hold."""
    return "".join(x + "\0" for f in flags for x in f)
