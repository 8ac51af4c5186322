"""`compress` refuses bad input with one line (exit 2) before any stage starts, writing nothing; the recipe's
rules (file < command line, typed values, rounds) and the stage plan, without running anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_prune.cli.commands import run_command
from tests.helpers import make_hf_model, save_tiny_tokenizer

SAMPLES = Path(__file__).resolve().parents[2] / "megatron_prune" / "data" / "samples"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "hf"
    make_hf_model(path, seed=2, num_attention_heads=8, num_key_value_heads=4)
    save_tiny_tokenizer(path)
    return path


def argv(hf: Path, out: Path, **changes) -> list[str]:
    flags = {"--hf-dir": hf, "--save": out, "--target-params": "50%", "--tp": "2",
             "--train-data": SAMPLES / "train.jsonl", "--eval-data": SAMPLES / "heldout.jsonl",
             "--train-iters": "2", "--seq-length": "32", "--global-batch-size": "4",
             "--prune-args": "--width-multiple 8", **changes}
    return [str(x) for k, v in flags.items() if v is not None for x in (k, v)]


def refused(capsys, args: list[str], start: str) -> None:
    try:
        code = run_command("compress", args)
    except SystemExit as e:  # argparse's error exit (a stage's own parser)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert start in err, err


@pytest.mark.parametrize("changes,start", [
    ({"--target-params": "1%"}, "budget"),
    ({"--tp": "3"}, "TP 3 does not divide 8 heads"),
    ({"--train-data": "/nonexistent/data"}, "--train-data /nonexistent/data: no such file"),
    ({"--prune-args": "--width-multiple 8 --bogus 1"}, "unrecognized arguments: --bogus"),
    ({"--train-iters": "0"}, "error: arguments: --train-iters must be a positive integer"),
    ({"--global-batch-size": "3", "--micro-batch-size": "2"}, "batch"),
    ({"--target-params": None}, "give a budget"),
    # rounds split a parameter count; the recipe's message once prefixed (not "arguments: arguments:")
    ({"--target-params": None, "--target-memory-gb": "0.001", "--steps": "2"},
     "error: arguments: --steps 2 splits the parameter budget into rounds"),
    # the train flags apply to every round: a warm-up as long as a round is refused before any stage
    ({"--steps": "2", "--train-args": "--lr-warmup-iters 1"}, "error: 04-train-1: 1 of the --train-iters 2 in "
     "--steps 2 rounds: --lr-warmup-iters 1 must be fewer than the decay iterations 1"),
])
def test_bad_input_is_one_line_before_any_stage(hf, tmp_path, capsys, changes, start):
    out = tmp_path / "out"
    refused(capsys, argv(hf, out, **changes), start)
    assert not out.exists()


def test_eval_text_too_short(hf, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Hi.")
    refused(capsys, argv(hf, tmp_path / "out", **{"--eval-data": short}), "fewer than one window")
    assert not (tmp_path / "out").exists()


def test_config_file_then_command_line(hf, tmp_path):
    from megatron_prune.compress.recipe import build_recipe

    file_values = {"hf-dir": str(hf), "save": "out", "train_data": "a.jsonl", "eval_data": "e.txt",
                   "train_iters": 6, "seq_length": 32, "global_batch_size": 4, "target_params": "40%",
                   "prune_args": ["--width-multiple", "8"], "steps": 3}
    r = build_recipe(file_values, {"train_iters": "7", "steps": None}, source="recipe.yaml")
    assert r.train_iters == 7 and r.steps == 3 and r.target_params == "40%"
    assert r.save == str(Path("out").resolve()) and r.train_data == (str(Path("a.jsonl").resolve()),)
    assert r.round_iters() == [2, 2, 3]
    assert build_recipe(json.loads(json.dumps(r.to_dict())), {}, "again") == r
    with pytest.raises(Exception, match="unknown setting"):
        build_recipe({**file_values, "train_itres": 3}, {}, "recipe.yaml")


def test_steps_reach_the_budget_geometrically(hf):
    from megatron_prune.compress.plan import build_stages
    from megatron_prune.compress.recipe import build_recipe

    r = build_recipe({}, {"hf_dir": str(hf), "save": "/tmp/x", "train_data": ["/d/p"], "eval_data": "/e.txt",
                          "train_iters": 4, "seq_length": 32, "global_batch_size": 4, "target_params": "25%",
                          "steps": 2, "tp": 2, "train_tp": 1}, "arguments")
    stages = build_stages(r, 1000, (False,))
    names = [s.name for s in stages]
    assert names == ["01-convert", "02-prune-1", "03-reshard", "04-train-1", "05-prune-2", "06-train-2",
                     "07-export", "08-eval", "09-publish"]
    targets = [s.commands[0].args[s.commands[0].args.index("--target-params") + 1] for s in stages
               if s.kind == "prune"]
    assert targets == ["500", "250"]  # 1000 x 0.25^(1/2), then 1000 x 0.25
    # round 2's drop limits are measured from the source, so that both rounds stay within them together
    prunes = [s.commands[0].args for s in stages if s.kind == "prune"]
    assert "--limits-of" not in prunes[0] and prunes[1][prunes[1].index("--limits-of") + 1] == str(hf)
    trains = [s.commands[0].args for s in stages if s.kind == "train"]
    assert [a[a.index("--train-iters") + 1] for a in trains] == ["2", "2"]
    # round 2 reads the data after round 1's 2 x 4 samples, not round 1's again
    assert "--skip-samples" not in trains[0] and trains[1][trains[1].index("--skip-samples") + 1] == "8"
    reshards = [s for s in stages if s.kind == "reshard"]
    assert [c.args[c.args.index("--load") + 1] for c in reshards[0].commands] == [
        stages[1].outputs["ckpt"], stages[0].outputs["ckpt"]]  # the round-1 student and the teacher, once


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        run_command("compress", ["--help"])
    assert e.value.code == 0 and "--target-params" in capsys.readouterr().out
