"""The demo's fallback model: when SmolLM2 cannot be obtained, a small LLaMA trained here from scratch.

Everything comes from the package itself: a byte-level BPE tokenizer learnt on the shipped training text, a
randomly initialised `LlamaForCausalLM` (GQA, tied embeddings, so the pipeline meets the same cases as SmolLM2),
and LM-loss pretraining with this project's own `train` command. The result is an ordinary HF directory, so the
rest of the demo runs unchanged. Its shape allows TP 1 and 3 like SmolLM2's (6 heads, 3 query groups).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from megatron_prune.data.text import jsonl_texts
from megatron_prune.demo import stages
from megatron_prune.demo.pipeline import run_cli

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TinyModel:
    vocab: int = 2048
    layers: int = 6
    hidden: int = 192
    heads: int = 6
    groups: int = 3
    ffn: int = 528                # divisible by TP 3
    pretrain_iters: int = 400
    seq_length: int = 128
    global_batch: int = 16
    lr: float = 5e-3

    def prune_plan(self, quick: bool) -> stages.DemoPlan:
        """About half the non-embedding parameters: 6 -> 4 layers, hidden 192 -> 144, heads 6 -> 3, FFN 528 -> 342."""
        return stages.DemoPlan(layers=4, hidden=144, heads=3, groups=3, ffn=342, calib_samples=8,
                               train_iters=30 if quick else 80, global_batch=16, lr=2e-3, eval_iters=1)


def train_tokenizer(train_jsonl: Path, out_dir: Path, vocab: int) -> None:
    """A byte-level BPE (GPT-2/LLaMA-3 style) learnt on the training text, saved as an HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(jsonl_texts(train_jsonl), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(out_dir)


def random_init(model: TinyModel, out_dir: Path, eos_id: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=model.vocab, hidden_size=model.hidden, intermediate_size=model.ffn,
                      num_hidden_layers=model.layers, num_attention_heads=model.heads,
                      num_key_value_heads=model.groups, max_position_embeddings=1024, rope_theta=10000.0,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos_id, pad_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)


def build_tiny_model(work: Path, hf_out: Path, train_jsonl: Path, log: Path, spec: TinyModel) -> Path:
    """Tokenizer, random init, LM pretraining (2 data-parallel ranks), export: an HF directory at hf_out."""
    from transformers import AutoTokenizer

    from megatron_prune.checkpoint.hf_io import copy_tokenizer_files

    shutil.rmtree(work, ignore_errors=True)  # never resume a stale run left in the demo's directory
    init = work / "init-hf"
    train_tokenizer(train_jsonl, init, spec.vocab)
    random_init(spec, init, AutoTokenizer.from_pretrained(init).eos_token_id)
    run_cli(["convert", "hf-to-megatron", "--hf-dir", str(init), "--save", str(work / "init-tp1"), "--tp", "1",
             "--dtype", "fp32", "--overwrite"], log=log)
    data = stages.preprocess(train_jsonl, init, work / "data" / "tiny", log)
    plan = stages.DemoPlan(train_iters=spec.pretrain_iters, seq_length=spec.seq_length,
                           global_batch=spec.global_batch, lr=spec.lr, eval_iters=1)
    stages.train(work / "init-tp1", None, data, init, work / "pretrained", plan, log)
    tmp = hf_out.parent / f".{hf_out.name}.tmp"
    run_cli(["convert", "megatron-to-hf", "--load", str(work / "pretrained"), "--save", str(tmp), "--overwrite"],
            log=log)
    copy_tokenizer_files(init, tmp)
    shutil.rmtree(hf_out, ignore_errors=True)
    tmp.rename(hf_out)
    return hf_out
