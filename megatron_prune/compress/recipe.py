"""The compress job's one settings object: defaults < --config file (YAML or JSON) < command line, validated once,
written back as OUT/recipe.yaml so `compress --config OUT/recipe.yaml` runs the same job again."""

from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from megatron_prune.errors import InputError as ConfigError

# Stages whose own options pass through untouched: `--prune-args "--importance taylor"` or, in a recipe,
# `prune_args: [--importance, taylor]`. Each list is parsed by that stage's own parser before anything runs.
PASS_THROUGH = ("convert_args", "preprocess_args", "prune_args",
                "reshard_args", "train_args", "export_args", "eval_args")
PATHS = ("hf_dir", "save", "calib_data", "eval_data")
NO_BUDGET = ("give a budget: --target-params (e.g. 50%) and/or --target-memory-gb (or the pruned sizes in "
             "--prune-args)")


@dataclass(frozen=True)
class Recipe:
    hf_dir: str
    save: str
    train_data: tuple[str, ...]
    eval_data: str
    train_iters: int
    seq_length: int
    global_batch_size: int
    target_params: str | None = None
    target_memory_gb: str | None = None
    tp: int = 1                        # convert and prune
    train_tp: int | None = None        # training and evaluation (default: tp)
    calib_data: str | None = None
    micro_batch_size: int | None = None
    steps: int = 1
    nproc: int | None = None           # training processes per node (default: the node's GPUs, else train_tp)
    eval_max_tokens: int | None = None
    convert_args: tuple[str, ...] = ()
    preprocess_args: tuple[str, ...] = ()
    prune_args: tuple[str, ...] = ()
    reshard_args: tuple[str, ...] = ()
    train_args: tuple[str, ...] = ()
    export_args: tuple[str, ...] = ()
    eval_args: tuple[str, ...] = ()
    source: str = field(default="arguments", compare=False)

    def __post_init__(self) -> None:
        for name in ("train_iters", "seq_length", "global_batch_size", "tp", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{self.source}: {_flag(name)} must be a positive integer, got "
                                  f"{getattr(self, name)!r}")
        if self.target_params is None and self.target_memory_gb is None and not self.prune_args:
            # (or the sizes themselves in --prune-args, as the demo's recipe does; prune's own parser checks them)
            raise ConfigError(f"{self.source}: {NO_BUDGET}")
        if self.steps > 1 and self.target_params is None:
            raise ConfigError(f"{self.source}: --steps {self.steps} splits the parameter budget into rounds "
                              f"(geometrically); a memory budget alone is not split: give --target-params too "
                              f"(--target-memory-gb {self.target_memory_gb} then caps the last round)")
        if self.train_iters < self.steps:
            raise ConfigError(f"{self.source}: --train-iters {self.train_iters} is fewer than --steps "
                              f"{self.steps}: every round trains at least one iteration")
        if not self.train_data:
            raise ConfigError(f"{self.source}: --train-data is required")

    @property
    def training_tp(self) -> int:
        return self.train_tp or self.tp

    def round_iters(self) -> list[int]:
        """Training iterations per round: the total split evenly, the remainder to the last rounds."""
        base, extra = divmod(self.train_iters, self.steps)
        return [base + (1 if r >= self.steps - extra else 0) for r in range(self.steps)]

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "source" and value not in (None, ()):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


FIELDS = {f.name: f for f in dataclasses.fields(Recipe) if f.name != "source"}


def build_recipe(file_values: Mapping[str, Any], cli_values: Mapping[str, Any], source: str) -> Recipe:
    """Recipe from a --config file's mapping overridden by the command line's explicit options (None: not given).
    Paths become absolute, so the written recipe runs from any directory."""
    values = {str(k).replace("-", "_"): v for k, v in file_values.items()}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    values.update({k: v for k, v in cli_values.items() if v is not None and k in FIELDS})
    for name in PASS_THROUGH:
        if isinstance(values.get(name), str):
            values[name] = shlex.split(values[name])
    try:
        values = {k: _typed(k, v) for k, v in values.items()}
        missing = [_flag(n) for n, f in FIELDS.items() if f.default is dataclasses.MISSING and n not in values]
        if missing:
            raise ConfigError(f"{source}: missing {', '.join(missing)}")
        return Recipe(**values, source=source)
    except ConfigError:  # Recipe's own checks: the message names the source already
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None


def _typed(name: str, value: Any) -> Any:
    kind = str(FIELDS[name].type)
    if kind.startswith("tuple"):
        items = [value] if isinstance(value, str) else list(value)
        items = [str(v) for v in items]
        if name == "train_data":
            items = [_absolute(v) for v in items]
        return tuple(items)
    if kind.startswith("int"):
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{_flag(name)} must be an integer, got {value!r}")
        return int(value)
    value = str(value)
    return _absolute(value) if name in PATHS else value


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def write_recipe(recipe: Recipe, out: Path) -> None:
    from megatron_prune.checkpoint.atomic import atomic_write_text

    atomic_write_text(out, recipe.to_yaml())
