"""`megatron-lm-args`: every printed pretrain_gpt.py flag equals what the checkpoint holds, read independently from
the rank files (tensor shapes, key names, dtypes, args) and megatron_prune.json; spellings from Megatron-LM's
megatron/training/arguments.py."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from megatron_prune.__main__ import main
from megatron_prune.checkpoint.convert_files import hf_to_megatron
from megatron_prune.checkpoint.reshard_files import reshard
from tests.helpers import VARIANTS, make_hf_model, save_tiny_tokenizer

# Flags of Megatron-LM's arguments.py (and TransformerConfig fields it turns into flags) that the command may print.
MEGATRON_LM_FLAGS = {
    "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--num-layers", "--hidden-size",
    "--ffn-hidden-size", "--num-attention-heads", "--group-query-attention", "--num-query-groups", "--kv-channels",
    "--seq-length", "--max-position-embeddings", "--position-embedding-type", "--rotary-base", "--rotary-percent",
    "--use-rope-scaling", "--rope-scaling-factor", "--normalization", "--norm-epsilon", "--swiglu",
    "--disable-bias-linear", "--attention-dropout", "--hidden-dropout", "--untie-embeddings-and-output-weights",
    "--make-vocab-size-divisible-by", "--bf16", "--fp16", "--transformer-impl", "--no-persist-layer-norm",
    "--tokenizer-type", "--tokenizer-model", "--ckpt-format", "--load", "--use-checkpoint-args", "--no-load-optim",
    "--no-load-rng"}


def run_cli(capsys, *argv):
    capsys.readouterr()
    rc = main(["megatron-lm-args", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def parse_flags(text: str) -> dict[str, list[str]]:
    tokens = shlex.split(text.replace("\\\n", " "))
    flags: dict[str, list[str]] = {}
    for tok in tokens:
        if tok.startswith("--"):
            assert tok not in flags, f"{tok} printed twice"
            flags[tok] = []
            current = tok
        else:
            flags[current].append(tok)
    return flags


def rank_files(root: Path) -> dict[tuple[int, int], dict]:
    """{(tp_rank, pp_rank): state} of the tracked iteration, read with plain torch."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    tracker = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    it_dir = root / ("release" if tracker == "release" else f"iter_{int(tracker):07d}")
    out = {}
    for d in it_dir.iterdir():
        m = re.fullmatch(r"mp_rank_(\d\d)(?:_(\d\d\d))?", d.name)
        out[int(m.group(1)), int(m.group(2) or 0)] = torch.load(d / "model_optim_rng.pt", weights_only=True)
    return out


def check_against_checkpoint(root: Path, flags: dict[str, list[str]], tokenizer: Path | None = None) -> None:
    assert set(flags) <= MEGATRON_LM_FLAGS, set(flags) - MEGATRON_LM_FLAGS
    shape = json.loads((root / "megatron_prune.json").read_text())["shape"]
    ranks = rank_files(root)
    tp, pp = max(t for t, _ in ranks) + 1, max(p for _, p in ranks) + 1
    first, last = ranks[0, 0]["model"], ranks[0, pp - 1]["model"]
    args = ranks[0, 0]["args"]
    one = lambda f: flags[f][0]  # noqa: E731

    assert (int(one("--tensor-model-parallel-size")), int(one("--pipeline-model-parallel-size"))) == (tp, pp)
    layers = sum(len({k.split(".")[2] for k in ranks[0, p]["model"] if k.startswith("decoder.layers.")})
                 for p in range(pp))
    assert int(one("--num-layers")) == layers == shape["num_layers"]
    emb = first["embedding.word_embeddings.weight"]
    assert int(one("--hidden-size")) == emb.shape[1] == shape["hidden_size"]
    assert int(one("--ffn-hidden-size")) == first["decoder.layers.0.mlp.linear_fc2.weight"].shape[1] * tp
    heads, kv = int(one("--num-attention-heads")), int(one("--kv-channels"))
    groups = int(one("--num-query-groups")) if "--num-query-groups" in flags else heads
    assert ("--group-query-attention" in flags) == (groups != heads)
    assert (heads, groups, kv) == (shape["num_attention_heads"], shape["num_query_groups"], shape["kv_channels"])
    assert first["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0] * tp == (heads + 2 * groups) * kv
    assert first["decoder.layers.0.self_attention.linear_proj.weight"].shape[1] * tp == heads * kv
    assert int(one("--seq-length")) == args.seq_length
    assert int(one("--max-position-embeddings")) == shape["max_position_embeddings"]
    assert one("--position-embedding-type") == "rope" and float(one("--rotary-percent")) == 1.0
    assert int(one("--rotary-base")) == shape["rope_theta"] == args.rotary_base
    rs = shape["rope_scaling"]
    assert ("--use-rope-scaling" in flags) == (rs is not None)
    if rs:
        assert float(one("--rope-scaling-factor")) == rs["factor"] == args.rope_scaling_factor
    assert one("--normalization") == "RMSNorm" and "--swiglu" in flags and "--disable-bias-linear" in flags
    assert float(one("--norm-epsilon")) == shape["norm_eps"] == args.layernorm_epsilon
    assert ("--untie-embeddings-and-output-weights" in flags) == (not shape["tie_word_embeddings"])
    assert ("output_layer.weight" in last) == (not shape["tie_word_embeddings"] or pp > 1)
    divisible = int(one("--make-vocab-size-divisible-by"))
    assert (emb.shape[0] * tp) % (divisible * tp) == 0 and emb.shape[0] * tp >= shape["vocab_size"]
    dtype = {torch.bfloat16: "--bf16", torch.float16: "--fp16", torch.float32: None}[emb.dtype]
    assert {"--bf16", "--fp16"} & set(flags) == ({dtype} if dtype else set())
    local = "decoder.layers.0.input_layernorm.weight" in first
    assert one("--transformer-impl") == ("local" if local else "transformer_engine")
    assert ("--no-persist-layer-norm" in flags) == local
    assert one("--tokenizer-type") == "HuggingFaceTokenizer"
    tokenizer = (tokenizer or root).resolve()
    assert Path(one("--tokenizer-model")) == tokenizer and (tokenizer / "tokenizer.json").is_file()
    assert one("--ckpt-format") == "torch" and Path(one("--load")) == root.resolve()
    assert {"--use-checkpoint-args", "--no-load-optim", "--no-load-rng"} <= set(flags)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm_args")
    save_tiny_tokenizer(root / "hf", vocab_size=300)
    make_hf_model(root / "hf", **{**VARIANTS["llama3rope"], "vocab_size": 300}, rms_norm_eps=1e-6)
    hf_to_megatron(root / "hf", root / "tp2pp2", tp=2, pp=2, progress=False)
    save_tiny_tokenizer(root / "hf-tied", vocab_size=300)
    make_hf_model(root / "hf-tied", **{**VARIANTS["tied"], "vocab_size": 300})
    hf_to_megatron(root / "hf-tied", root / "bf16-te", tp=1, dtype="bf16", te_names=True, progress=False)
    return root


@pytest.mark.parametrize("name", ["tp2pp2", "bf16-te"])
def test_converted(converted, capsys, name):
    rc, out, err = run_cli(capsys, "--load", str(converted / name))
    assert rc == 0 and err == "", err
    check_against_checkpoint(converted / name, parse_flags(out))


def test_resharded_and_one_line(converted, capsys, tmp_path):
    reshard(converted / "tp2pp2", tmp_path / "tp1", tp=1, progress=False)
    rc, out, _ = run_cli(capsys, "--load", str(tmp_path / "tp1"), "--one-line")
    assert rc == 0 and out.count("\n") == 1
    flags = parse_flags(out)
    check_against_checkpoint(tmp_path / "tp1", flags)
    assert flags["--tensor-model-parallel-size"] == ["1"]


def test_trained(converted, capsys, tmp_path):
    """A training checkpoint: iter_0000007/ with its own args (seq_length of the run)."""
    src, out = converted / "tp2pp2", tmp_path / "trained"
    shutil.copytree(src, out)
    (out / "release").rename(out / "iter_0000007")
    for path in out.glob("iter_0000007/*/model_optim_rng.pt"):
        state = torch.load(path, weights_only=True)
        state["iteration"], state["args"].seq_length = 7, 64
        torch.save(state, path)
    (out / "latest_checkpointed_iteration.txt").write_text("7")
    rc, text, _ = run_cli(capsys, "--load", str(out))
    assert rc == 0
    flags = parse_flags(text)
    check_against_checkpoint(out, flags)
    assert flags["--seq-length"] == ["64"]


def test_tokenizer_option_and_padding_warning(converted, capsys, tmp_path):
    sp = tmp_path / "sp.model"  # 32000 pieces: Megatron-LM pads to 32000 at TP=2, the checkpoint has 512 rows
    shutil.copy(Path(__file__).parent.parent / "data/mistral_tokenizer.model.v1", sp)
    rc, out, err = run_cli(capsys, "--load", str(converted / "tp2pp2"), "--tokenizer", str(sp))
    flags = parse_flags(out)
    assert rc == 0 and flags["--tokenizer-model"] == [str(sp.resolve())]
    assert flags["--tokenizer-type"] == ["Llama2Tokenizer"]
    assert err.startswith("warning:") and "pads to 32000" in err and "512 rows" in err


def test_sentencepiece_tokenizer_flags(converted, capsys, tmp_path):
    sp = tmp_path / "tokenizer.model"
    shutil.copy(Path(__file__).parent.parent / "data/mistral_tokenizer.model.v1", sp)
    from megatron_prune.checkpoint.mlm_command import tokenizer_flags

    assert tokenizer_flags(tmp_path) == [["--tokenizer-type", "Llama2Tokenizer"], ["--tokenizer-model", str(sp)]]


def test_no_tokenizer_is_one_line_error(converted, capsys, tmp_path):
    shutil.copytree(converted / "tp2pp2", tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*", "special*"))
    rc, out, err = run_cli(capsys, "--load", str(tmp_path / "bare"))
    assert rc == 2 and out == "" and err.startswith("error:") and "pass --tokenizer" in err
    assert err.count("\n") == 1


def test_uneven_shards_refused(converted, capsys, tmp_path):
    shutil.copytree(converted / "tp2pp2", tmp_path / "uneven")
    meta = json.loads((tmp_path / "uneven/megatron_prune.json").read_text())
    meta["rank_sizes"] = {"groups": [[1, 1]] * 4, "ffn": [[40, 56]] * 4}
    (tmp_path / "uneven/megatron_prune.json").write_text(json.dumps(meta))
    rc, _, err = run_cli(capsys, "--load", str(tmp_path / "uneven"))
    assert rc == 2 and "uneven shards" in err and "reshard" in err


def test_unreadable_tokenizer_only_warns(converted, capsys, tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok/tokenizer.json").write_text("{}")
    rc, out, err = run_cli(capsys, "--load", str(converted / "tp2pp2"), "--tokenizer", str(tmp_path / "tok"))
    assert rc == 0 and parse_flags(out)["--tokenizer-model"] == [str((tmp_path / "tok").resolve())]
    assert err.startswith("warning: could not check the tokenizer's size") and err.count("\n") == 1


def test_one_line_inside_dollar_parens_never_splits_a_path(converted, tmp_path):
    """Issue 26: `$(megatron-lm-args --one-line)` splits words at whitespace whatever their quotes: a path with a
    space came out as two words. Now such a value is refused in one line (exit 2), and --null is exact."""
    import subprocess
    import sys

    spaced = tmp_path / "my ckpt"
    shutil.copytree(converted / "tp2pp2", spaced)
    cmd = f"{shlex.quote(sys.executable)} -m megatron_prune megatron-lm-args --load {shlex.quote(str(spaced))}"
    words = subprocess.run(["bash", "-c", f'printf "%s\\n" $({cmd} --one-line)'], capture_output=True, text=True)
    direct = subprocess.run(["bash", "-c", f"{cmd} --one-line"], capture_output=True, text=True)
    got = words.stdout.splitlines()
    split_wrongly = direct.returncode == 0 and str(spaced.resolve()) not in got
    assert not split_wrongly, got[-8:]
    assert direct.returncode == 2 and direct.stderr.startswith("error:") and direct.stderr.count("\n") == 1
    exact = subprocess.run(["bash", "-c", f"{cmd} --null | xargs -0 printf '%s\\n'"], capture_output=True,
                           text=True)
    lines = exact.stdout.splitlines()
    assert lines[lines.index("--load") + 1] == str(spaced.resolve())
