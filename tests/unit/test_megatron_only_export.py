"""--megatron-only-shapes can pick shapes whose hidden size is not a multiple of the head count. Their HF export
is written, with one warning line: the tensors and config are right (megatron-core and transformers 4.x load
them), but transformers >= 5 refuses the config, as the warning says."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_search_space import ckpt  # noqa: F401 - the tiny TP=2 checkpoint fixture


def test_export_of_a_megatron_only_shape_is_written_with_one_warning(ckpt, capsys):  # noqa: F811 (fixture)
    import os
    import subprocess
    import sys

    from transformers import AutoConfig

    from megatron_prune.__main__ import main
    from megatron_prune.checkpoint.convert_files import hf_to_megatron

    if not (ckpt / "tp1").exists():
        hf_to_megatron(ckpt / "hf", ckpt / "tp1", tp=1, progress=False)
    pruned = ckpt / "tp1-hidden36"
    res = subprocess.run([sys.executable, "-m", "megatron_prune", "prune", "--load", str(ckpt / "tp1"), "--save",
                          str(pruned), "--hidden-size-remain", "36", "--width-multiple", "4", "--no-progress"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert [line for line in res.stderr.splitlines() if "transformers >= 5" in line][0].startswith(
        "warning: hidden 36 is not a multiple of heads 8")
    capsys.readouterr()
    rc = main(["convert", "megatron-to-hf", "--load", str(pruned), "--save", str(ckpt / "hf36"), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith("wrote ") and (ckpt / "hf36" / "model.safetensors").is_file()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: hidden 36 is not a multiple of heads 8: transformers >= 5")
    config = json.loads((ckpt / "hf36" / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["head_dim"]) == (36, 8, 16)
    with pytest.raises(Exception, match="36|divisible|multiple"):  # the refusal the warning announces
        AutoConfig.from_pretrained(ckpt / "hf36")
