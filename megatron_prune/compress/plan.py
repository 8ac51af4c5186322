"""The compress job as a list of stages, each one or more commands of the CLI a user would type. Pure: from a
Recipe and the source's parameter count to the stage list; nothing is read or run here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_prune.compress.recipe import Recipe


@dataclass(frozen=True)
class Command:
    args: tuple[str, ...]          # `python -m megatron_prune ARGS`
    torchrun: bool = False         # through cli/prelaunch.py: its checks, then torchrun
    nproc: int | None = None       # prelaunch --nproc (None: the subcommand's default)
    label: str = ""                # which model an eval measures, for the report


@dataclass(frozen=True)
class Stage:
    name: str                      # "04-train-1"
    kind: str                      # convert | preprocess | prune | reshard | train | export | eval | publish
    commands: tuple[Command, ...]
    outputs: dict[str, str] = field(default_factory=dict)   # role -> path written by this stage
    inputs: tuple[str, ...] = ()   # files / directories from outside the job (their size and mtime count)
    resumable: bool = False        # its command resumes from its own partial output (train)
    publish: str | None = None     # publish: the exported HF directory copied to OUT/hf

    @property
    def dir_name(self) -> str:
        return self.name


def _subcommand(args: tuple[str, ...]) -> str:
    return " ".join(args[:2]) if args[0] == "convert" else args[0]


class _Builder:
    def __init__(self, recipe: Recipe, source_params: int, data_is_file: tuple[bool, ...]):
        self.r, self.p0, self.data_is_file = recipe, source_params, data_is_file
        self.stages: list[Stage] = []
        self.root = Path(recipe.save) / "stages"

    def add(self, name: str, kind: str, commands: list[Command], outputs: dict[str, Path], inputs=(),
            resumable=False, publish=None) -> dict[str, str]:
        full = f"{len(self.stages) + 1:02d}-{name}"
        outs = {k: str(self.root / full / v) for k, v in outputs.items()}
        self.stages.append(Stage(full, kind, tuple(commands), outs, tuple(str(i) for i in inputs), resumable,
                                 publish))
        return outs

    def out(self, name: str) -> Path:
        """The directory of the stage `add` makes next."""
        return self.root / f"{len(self.stages) + 1:02d}-{name}"


def build_stages(recipe: Recipe, source_params: int, data_is_file: tuple[bool, ...]) -> list[Stage]:
    """The stage list of `recipe`; `data_is_file[i]`: train_data[i] is a text file to tokenize (else a prefix)."""
    b = _Builder(recipe, source_params, data_is_file)
    r = recipe
    teacher = b.add("convert", "convert", [Command(
        ("convert", "hf-to-megatron", "--hf-dir", r.hf_dir, "--save", str(b.out("convert") / "ckpt"), "--tp",
         str(r.tp), "--no-progress", *r.convert_args))], {"ckpt": "ckpt"}, inputs=[r.hf_dir])["ckpt"]
    data = _data_prefixes(b)
    student, pruned, iters = teacher, teacher, r.round_iters()
    for k in range(1, r.steps + 1):
        pruned = _prune(b, student, k)
        student = pruned
        if k == 1 and r.training_tp != r.tp:
            student, teacher = _reshard(b, pruned, teacher)
        student = _train(b, student, teacher, data, iters[k - 1], k, skip=sum(iters[:k - 1]) * r.global_batch_size)
    exported = _export(b, pruned, student)
    _evaluate(b, {"original": b.stages[0].outputs["ckpt"], "pruned": pruned, "recovered": student})
    b.add("publish", "publish", [], {}, publish=exported)
    return b.stages


def _data_prefixes(b: _Builder) -> list[str]:
    r = b.r
    files = [d for d, is_file in zip(r.train_data, b.data_is_file) if is_file]
    prefixes = [d for d, is_file in zip(r.train_data, b.data_is_file) if not is_file]
    if files:
        prefix = b.out("preprocess") / "train"
        b.add("preprocess", "preprocess", [Command(
            ("preprocess", "--input", *files, "--tokenizer", r.hf_dir, "--output-prefix", str(prefix),
             "--append-eod", "--workers", "1", "--no-progress", *r.preprocess_args))],
            {"prefix": "train_text_document"}, inputs=files)
        prefixes.append(f"{prefix}_text_document")
    return prefixes


def round_target(r: Recipe, source_params: int, k: int) -> list[str]:
    """Round k's budget flags: the user's own in one step; in K steps the parameter count P0 * (target/P0)^(k/K),
    the memory ceiling only in the last."""
    if r.steps == 1:
        flags = ["--target-params", r.target_params] if r.target_params is not None else []
        return flags + (["--target-memory-gb", r.target_memory_gb] if r.target_memory_gb is not None else [])
    from megatron_prune.prune.budget import parse_budget

    ratio = parse_budget(r.target_params, source_params) / source_params
    flags = ["--target-params", str(round(source_params * ratio ** (k / r.steps)))]
    if k == r.steps and r.target_memory_gb is not None:
        flags += ["--target-memory-gb", r.target_memory_gb]
    return flags


def _prune(b: _Builder, load: str, k: int) -> str:
    """Round k's prune. From round 2 on, the drop limits (--max-depth-drop / --max-width-drop) are measured from
    the source model, not from the previous round's: the rounds together stay within them, as one prune does."""
    r = b.r
    name = "prune" if r.steps == 1 else f"prune-{k}"
    calib = ["--calib-data", r.calib_data] if r.calib_data else []
    limits = ["--limits-of", r.hf_dir] if k > 1 else []
    return b.add(name, "prune", [Command(
        ("prune", "--load", load, "--save", str(b.out(name) / "ckpt"), *round_target(r, b.p0, k), *calib,
         *limits, "--no-progress", "--json", *r.prune_args), torchrun=True)],
        {"ckpt": "ckpt"}, inputs=[r.calib_data] if r.calib_data else [])["ckpt"]


def _reshard(b: _Builder, student: str, teacher: str) -> tuple[str, str]:
    """Student and teacher at the training TP (distillation needs the same TP)."""
    r, out = b.r, b.out("reshard")
    cmds = [Command(("reshard", "--load", src, "--save", str(out / role), "--tp", str(r.training_tp),
                     "--no-progress", *r.reshard_args)) for role, src in (("student", student), ("teacher", teacher))]
    outs = b.add("reshard", "reshard", cmds, {"student": "student", "teacher": "teacher"})
    return outs["student"], outs["teacher"]


def _train(b: _Builder, student: str, teacher: str, data: list[str], iters: int, k: int, skip: int) -> str:
    """Round k's recovery; its data continues where the previous rounds' stopped (`skip` samples), so K rounds
    read the same token stream as one run of all the iterations (not the first rounds' samples again)."""
    r = b.r
    name = "train" if r.steps == 1 else f"train-{k}"
    micro = ["--micro-batch-size", str(r.micro_batch_size)] if r.micro_batch_size else []
    skipped = ["--skip-samples", str(skip)] if skip else []
    args = ("train", "--load", student, "--save", str(b.out(name) / "ckpt"), "--teacher-load", teacher,
            "--data-path", *data, "--tp", str(r.training_tp), "--train-iters", str(iters), "--seq-length",
            str(r.seq_length), "--global-batch-size", str(r.global_batch_size), *micro, *skipped,
            # validation inside training off: the eval stage measures every model on --eval-data (give
            # --train-args "--eval-iters N" for it; a later flag wins)
            "--eval-iters", "0", *r.train_args)
    return b.add(name, "train", [Command(args, torchrun=True, nproc=r.nproc)], {"ckpt": "ckpt"},
                 resumable=True)["ckpt"]


def _export(b: _Builder, pruned: str, recovered: str) -> str:
    out = b.out("export")
    cmds = [Command(("convert", "megatron-to-hf", "--load", src, "--save", str(out / role), "--no-progress",
                     *b.r.export_args)) for role, src in (("pruned-hf", pruned), ("hf", recovered))]
    return b.add("export", "export", cmds, {"pruned-hf": "pruned-hf", "hf": "hf"})["hf"]


def _evaluate(b: _Builder, models: dict[str, str]) -> None:
    r = b.r
    limit = ["--max-tokens", str(r.eval_max_tokens)] if r.eval_max_tokens else []
    cmds = [Command(("eval", "--load", ckpt, "--text-file", r.eval_data, "--seq-length", str(r.seq_length), *limit,
                     "--json", *r.eval_args), torchrun=True, label=label) for label, ckpt in models.items()]
    b.add("eval", "eval", cmds, {}, inputs=[r.eval_data])
