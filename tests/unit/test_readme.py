"""Every command README.md shows names an existing script, subcommand or make target and only flags (and
variables) that entry lists: the cheap walk of the README (tests/dist/test_readme_commands.py runs the runnable ones
after the quick demo). The markers are described in tests/readme_commands.py."""

from __future__ import annotations

import pytest

from tests.readme_commands import Command, commands, problems

pytestmark = pytest.mark.timeout(600)


def test_every_readme_command_names_what_exists():
    found = commands()
    assert any(c.runnable and not c.text.startswith("make ") for c in found), "no runnable ```bash block"
    wrong = [f"{c}: {'; '.join(p)}" for c in found for p in [problems(c)] if p]
    assert not wrong, "\n".join(wrong)


SAMPLE = """# Title
Run `make demo` first; `torchrun` alone is prose, so is `--tp 2` and `tar czf kit.tgz .`.

```bash
bash scripts/eval.sh --load demo_out/compress/stages/01-convert/ckpt \\
  --text-file x.jsonl   # a comment
# a whole-line comment
.venv/bin/python -m megatron_prune --help
```

```bash template
bash scripts/prune_llama.sh --load ckpt/llama2-7b --save pruned --num-layers-remain 24
```

```
$ python -m megatron_prune megatron-lm-args --load ckpt
--tensor-model-parallel-size 2 \\
```

| what | command |
|---|---|
| x | `LOAD=ckpt bash scripts/reshard.sh --tp 2` (or `python -m megatron_prune reshard --load a --save b [--pp 2]`) |
"""


def test_markers_tell_commands_from_prose():
    found = [(c.line, c.text, c.runnable) for c in commands(SAMPLE)]
    assert found == [
        (2, "make demo", False),
        (5, "bash scripts/eval.sh --load demo_out/compress/stages/01-convert/ckpt --text-file x.jsonl", True),
        (8, ".venv/bin/python -m megatron_prune --help", True),
        (12, "bash scripts/prune_llama.sh --load ckpt/llama2-7b --save pruned --num-layers-remain 24", False),
        (16, "python -m megatron_prune megatron-lm-args --load ckpt", False),
        (22, "LOAD=ckpt bash scripts/reshard.sh --tp 2", False),
        (22, "python -m megatron_prune reshard --load a --save b [--pp 2]", False)]
    assert all(not problems(Command(t, n, r)) for n, t, r in found)


@pytest.mark.parametrize("text,problem", [
    ("torchrun --nproc-per-node 2 -m megatron_prune eval --load c", "bare `torchrun` is not on PATH"),
    ("bash scripts/transfer2.sh --load a", "no script scripts/transfer2.sh"),
    ("bash scripts/prune_llama.sh --load a --hidden-size-remian 3", "has no flag --hidden-size-remian"),
    ("HIDEN_SIZE_REMAIN=3 bash scripts/prune_llama.sh", "reads no variable HIDEN_SIZE_REMAIN"),
    ("python -m megatron_prune train --train-iter 2", "`train` has no flag --train-iter"),
    ("python -m megatron_prune evaluate --load a", "no subcommand 'evaluate"),
    ("make demo-fast", "no make target 'demo-fast'"),
])
def test_a_wrong_command_is_named(text, problem):
    assert any(problem in p for p in problems(Command(text, 1, False))), problems(Command(text, 1, False))


def test_a_quoted_pass_through_value_is_not_a_flag():
    """compress --train-args "--lr 5e-4": the quoted words are train's options, not compress's flags; a
    misspelt flag beside them is still named."""
    ok = 'python -m megatron_prune compress --save x --train-args "--lr 5e-4 --fp32"'
    assert not problems(Command(ok, 1, False))
    bad = 'python -m megatron_prune compress --sav x --train-args "--lr 5e-4"'
    assert any("has no flag --sav" in p for p in problems(Command(bad, 1, False)))
