"""Tiny HF LLaMA models for tests: the independent reference (transformers' own implementation)."""

from __future__ import annotations

from pathlib import Path

import torch

VARIANTS = {
    # name: LlamaConfig overrides
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, vocab_size=512),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2, vocab_size=512),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "vocab1000": dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
    "llama3rope": dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=512, rope_theta=500000.0,
                       max_position_embeddings=16384,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
              initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    if "rope_theta" in kw or "rope_scaling" in kw:  # transformers 5 spelling; 4.x reads the flat keys
        theta = kw.pop("rope_theta", 10000.0)
        scaling = kw.pop("rope_scaling", None) or {"rope_type": "default"}
        kw["rope_parameters"] = {**scaling, "rope_theta": theta}
    return LlamaConfig(**kw)


def make_hf_model(path: Path, seed: int = 0, **overrides):
    """Random-weight LlamaForCausalLM saved (fp32 safetensors) at `path`; returns the model."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**overrides)).eval()
    with torch.no_grad():  # norms at 1.0 would hide a wrong norm mapping
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


def random_tokens(vocab: int, batch: int = 2, seq: int = 33, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def save_tiny_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    """A small byte-level BPE HF tokenizer (tokenizer.json + config) trained on a fixed English text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times, "
            "it was the age of wisdom, it was the age of foolishness. ") * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return path
