"""Calibration text the pruner cannot use (issue 26): empty, shorter than one window, too short for the budget
search's held-out windows, or binary. Each is one `error:` line naming the file, found by `--check-only` (the
one-process check the shell script runs before torchrun) and by the run itself before any collective."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_prune.__main__ import main
from megatron_prune.checkpoint.convert_files import hf_to_megatron
from megatron_prune.errors import InputError
from tests.helpers import make_hf_model, save_tiny_tokenizer

SENTENCE = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. "


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    make_hf_model(root / "hf", num_attention_heads=8, num_key_value_heads=4)
    save_tiny_tokenizer(root / "hf")  # vocab 300 < the model's 512: the checkpoint's own tokenizer
    hf_to_megatron(root / "hf", root / "tp2", tp=2, progress=False)
    hf_to_megatron(root / "hf", root / "tp1", tp=1, progress=False)
    (root / "empty.txt").write_text("")
    (root / "blank.jsonl").write_text("\n  \n")
    (root / "short.txt").write_text("The quick brown fox.")
    (root / "ten.txt").write_text(SENTENCE * 4)  # 10 windows of 16 tokens: fewer than 16 held out + 1
    (root / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (root / "nul.txt").write_bytes(b"abc\x00\x00\x00def" * 100)
    (root / "long.txt").write_text(SENTENCE * 300)
    return root


def _check_only(root, *argv: str) -> tuple[int, str, str]:
    return main(["prune", "--load", str(root / "tp2"), "--save", str(root / "out"), "--check-only", *argv])


CASES = [  # (calibration file, extra flags, message)
    ("empty.txt", ["--ffn-hidden-size-remain", "48"], "empty.txt: holds no text"),
    ("blank.jsonl", ["--ffn-hidden-size-remain", "48"], "blank.jsonl: holds no text"),
    ("short.txt", ["--ffn-hidden-size-remain", "48"], r"short.txt: \d+ tokens, fewer than one window of 257"),
    ("binary.txt", ["--ffn-hidden-size-remain", "48"], "binary.txt: not UTF-8 text"),
    ("nul.txt", ["--ffn-hidden-size-remain", "48"], "nul.txt: not text: it holds NUL bytes"),
    ("ten.txt", ["--target-params", "60%", "--width-multiple", "8", "--calib-seq-length", "16",
                 "--calib-samples", "4"], r"ten.txt: \d+ calibration windows, the search needs at least 17"),
]


@pytest.mark.parametrize("importance", ["activation", "taylor"])
@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_check_only_refuses_unusable_calibration_text_in_one_line(root, capsys, importance, name, argv, message):
    import re

    rc = _check_only(root, "--importance", importance, "--calib-data", str(root / name), *argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and re.search(message, err), err
    assert str(root / name) in err
    assert not (root / "out").exists()


def test_a_random_budget_search_also_needs_its_held_out_windows(root, capsys):
    """The search ranks candidates on held-out windows whatever the importance: random needs them too."""
    rc = _check_only(root, "--importance", "random", "--calib-data", str(root / "ten.txt"), "--target-params", "60%",
                     "--width-multiple", "8", "--calib-seq-length", "16", "--calib-samples", "4")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "the search needs at least 17" in err and str(root / "ten.txt") in err, err


def test_check_only_accepts_usable_calibration_text(root, capsys):
    rc = _check_only(root, "--importance", "activation", "--calib-data", str(root / "long.txt"),
                     "--calib-seq-length", "16", "--ffn-hidden-size-remain", "48")
    assert rc == 0 and capsys.readouterr().out.startswith("ok: ")
    rc = _check_only(root, "--calib-data", str(root / "long.txt"), "--target-params", "60%", "--width-multiple", "8",
                     "--calib-seq-length", "16", "--calib-samples", "4", "--search-candidates", "2")
    out = capsys.readouterr().out
    assert rc == 0 and "a run evaluates 2 of them by loss" in out, out


def test_random_importance_reads_no_calibration_text(root, capsys):
    """Hand-given sizes with random or magnitude importance use no calibration data: not read, not refused."""
    for importance in ("random", "magnitude"):
        rc = _check_only(root, "--importance", importance, "--calib-data", str(root / "binary.txt"),
                         "--ffn-hidden-size-remain", "48")
        assert rc == 0, capsys.readouterr().err


def test_the_run_refuses_binary_calibration_data_in_one_line_before_loading(root):
    """The real run (one process, TP=1, as torchrun's single rank would): one line, exit 2, nothing written."""
    res = subprocess.run([sys.executable, "-m", "megatron_prune", "prune", "--load", str(root / "tp1"), "--save",
                          str(root / "out1"), "--importance", "activation", "--calib-data", str(root / "binary.txt"),
                          "--ffn-hidden-size-remain", "48", "--no-progress"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = res.stderr.strip()
    assert res.returncode == 2 and len(err.splitlines()) == 1, err[-3000:]
    assert err.startswith(f"error: {root / 'binary.txt'}: not UTF-8 text"), err
    assert not (root / "out1").exists()


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00garbage", "not UTF-8 text"),
    (b"", "holds no text"),
    (b'{"text": 3}\n', "not a JSON object with a 'text' field"),
    (b'{"txt": "a"}\n', "not a JSON object with a 'text' field"),
])
def test_read_text_names_the_file_and_line(tmp_path, content, message):
    from megatron_prune.data.text import read_text

    path = tmp_path / "c.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as e:
        read_text(path)
    assert str(path) in str(e.value) and len(str(e.value).splitlines()) == 1
