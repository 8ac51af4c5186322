import json

import pytest
import torch

from megatron_prune.data.text import read_text, token_windows


def test_windows_predict_every_token_once():
    ids = list(range(100))
    w = token_windows(ids, seq_length=8)
    assert w.shape == (12, 9)
    targets = torch.cat([x[1:] for x in w]).tolist()
    assert targets == list(range(1, 97))  # each token after the first exactly once; partial tail dropped
    assert token_windows(ids, 8, max_tokens=16).shape == (2, 9)


def test_windows_need_one_full_window():
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows([1, 2, 3], seq_length=8)


def test_read_text_jsonl_and_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]) + "\n\n")
    assert read_text(tmp_path / "a.jsonl") == "one\n\ntwo"
    (tmp_path / "b.txt").write_text("plain")
    assert read_text(tmp_path / "b.txt") == "plain"
    (tmp_path / "c.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(ValueError, match="c.jsonl:1: not a JSON object with a 'text' field"):
        read_text(tmp_path / "c.jsonl")
