"""TrainConfig: every training setting in one frozen dataclass, validated once, readable from YAML/JSON.

Names follow Megatron-LM's arguments (`micro_batch_size` is `--micro-batch-size`); a config file may spell keys
with dashes or underscores. Values from the command line override the file, the file overrides the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from megatron_prune.errors import UserError


LR_DECAY_STYLES = ("cosine", "linear", "constant")
# Where the machine has no CUDA device, the defaults that keep a first run short: the dataclass defaults are sized
# for GPUs (a 2048-token sequence, 8 sequences per step and 10 evaluation batches in bf16 made "2 iterations" of a
# 135M model run past 10 minutes on 2 CPU cores; fp32 is also faster than bf16 there). A CPU step is 4 x 256
# tokens: about 0.4 TFLOP for a 64M model (6 x parameters x tokens). Applied by the CLI (cli/train.py) below the
# user's settings, and stated in its --help.
CPU_DEFAULTS: dict[str, Any] = {"seq_length": 256, "global_batch_size": 4, "eval_iters": 2, "precision": "fp32",
                                "log_interval": 1}
PRECISIONS = ("bf16", "fp16", "fp32")
CKPT_FORMATS = ("torch", "torch_dist")  # Megatron-LM's --ckpt-format values (checkpoint.megatron_io.FORMATS)
PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class ConfigError(UserError, ValueError):
    """An invalid training configuration; the message names every factor involved."""


@dataclass(frozen=True)
class TrainConfig:
    # --- checkpoints
    load: str = ""                       # converted / pruned / training checkpoint (legacy or torch_dist)
    save: str | None = None              # training checkpoints go here; if it holds one, training resumes from it
    save_interval: int = 0               # 0: save only at the end
    keep_last: int = 2                   # keep the K most recent iteration checkpoints (0: keep all)
    finetune: bool = False               # take only the weights of a --load training checkpoint (fresh optimizer)
    exit_interval: int = 0               # save and stop at iterations divisible by this; 0: run to the end
    ckpt_format: str = "torch"           # training checkpoints: Megatron-LM's legacy rank files, or torch_dist
    # --- parallelism
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    use_te: bool = False                 # Transformer Engine layers (GPU with transformer_engine only)
    # --- batch and length of training
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 2048
    train_iters: int | None = None
    train_tokens: int | None = None      # alternative to train_iters: iterations = ceil(tokens / (gbs * seq))
    # --- optimizer and schedule
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    lr_decay_iters: int | None = None    # default: the training iterations
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0               # 0: no clipping
    # --- precision
    precision: str = "bf16"
    loss_scale: float | None = None      # fp16: constant loss scale; None: dynamic
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    max_bad_steps: int = 3               # abort after this many consecutive non-finite steps
    # --- data
    data_path: tuple[str, ...] = ()      # Megatron blend: "PREFIX ..." or "W1 PREFIX1 W2 PREFIX2 ..."
    valid_data_path: tuple[str, ...] = ()  # separate validation blend (then `split` is not used)
    split: str = "969,30,1"
    data_cache_path: str | None = None
    tokenizer: str | None = None         # default: the tokenizer files inside --load
    eod_mask_loss: bool = False
    seed: int = 1234
    skip_samples: int = 0                # start at this sample of the data order (continue another run's data)
    # --- evaluation and logging
    eval_interval: int = 0               # 0: evaluate only at the end
    eval_iters: int = 10                 # validation batches per evaluation (0: never evaluate)
    log_interval: int = 10
    metrics_file: str | None = None      # default: SAVE/metrics.jsonl
    tensorboard_dir: str | None = None
    peak_tflops: float | None = None     # per device, for MFU; default: looked up for known GPUs
    # --- distillation
    teacher_load: str | None = None
    kd_alpha: float = 0.5
    kd_temperature: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_path", tuple(str(p) for p in _as_list(self.data_path)))
        object.__setattr__(self, "valid_data_path", tuple(str(p) for p in _as_list(self.valid_data_path)))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        if not self.load:
            raise ConfigError("--load is required (a converted, pruned or training checkpoint)")
        if not self.data_path:
            raise ConfigError("--data-path is required (indexed dataset prefix(es), e.g. from `preprocess`)")
        for name in ("tp", "pp", "micro_batch_size", "global_batch_size", "seq_length", "log_interval",
                     "max_bad_steps", "loss_scale_window", "hysteresis"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("save_interval", "keep_last", "exit_interval", "lr_warmup_iters", "eval_interval",
                     "eval_iters", "skip_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.train_iters is None and self.train_tokens is None:
            raise ConfigError("give --train-iters N (iterations) or --train-tokens N (tokens) to say how long to train")
        if self.train_iters is not None and self.train_tokens is not None:
            raise ConfigError(f"give one of --train-iters and --train-tokens, not both (--train-iters "
                              f"{self.train_iters}, --train-tokens {self.train_tokens})")
        if (self.train_iters or self.train_tokens or 0) < 1:
            which = "--train-iters" if self.train_iters is not None else "--train-tokens"
            raise ConfigError(f"{which} must be positive, got {self.train_iters or self.train_tokens}")
        self._validate_schedule()
        self._validate_misc()
        parse_blend(self.data_path)
        if self.valid_data_path:
            parse_blend(self.valid_data_path)
        parse_split(self.split)

    def _validate_schedule(self) -> None:
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style {self.lr_decay_style!r} is not one of {', '.join(LR_DECAY_STYLES)}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need 0 <= --min-lr <= --lr (--min-lr {self.min_lr}, --lr {self.lr})")
        decay = self.lr_decay_iters if self.lr_decay_iters is not None else self.iterations
        if self.lr_warmup_iters >= decay:  # megatron-core's scheduler asserts warm-up < decay
            raise ConfigError(f"--lr-warmup-iters {self.lr_warmup_iters} must be fewer than the decay iterations "
                              f"{decay} (--lr-decay-iters {self.lr_decay_iters}, training iterations "
                              f"{self.iterations})")
        if self.weight_decay < 0 or self.clip_grad < 0 or self.adam_eps <= 0:
            raise ConfigError(f"need --weight-decay >= 0, --clip-grad >= 0, --adam-eps > 0 (--weight-decay "
                              f"{self.weight_decay}, --clip-grad {self.clip_grad}, --adam-eps {self.adam_eps})")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError(f"--adam-beta1 / --adam-beta2 must be in [0, 1) (--adam-beta1 {self.adam_beta1}, "
                              f"--adam-beta2 {self.adam_beta2})")

    def _validate_misc(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise ConfigError(f"--loss-scale must be positive, got {self.loss_scale}")
        if not 0.0 <= self.kd_alpha <= 1.0 or self.kd_temperature <= 0:
            raise ConfigError(f"need 0 <= --kd-alpha <= 1 and --kd-temperature > 0 "
                              f"(--kd-alpha {self.kd_alpha}, --kd-temperature {self.kd_temperature})")
        if self.ckpt_format not in CKPT_FORMATS:
            raise ConfigError(f"--ckpt-format {self.ckpt_format!r} is not one of {', '.join(CKPT_FORMATS)}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"--peak-tflops must be positive, got {self.peak_tflops}")
        if self.save is None and (self.save_interval or self.exit_interval):
            raise ConfigError(f"--save-interval {self.save_interval} / --exit-interval {self.exit_interval} "
                              f"need --save")
        if self.save is not None:
            self._check_save_paths()

    def _check_save_paths(self) -> None:
        """--save may be --load itself (Megatron-LM's resume idiom), but may not lie inside it, contain it, or
        overlap the teacher."""
        from megatron_prune.checkpoint.atomic import check_no_overlap

        if self.load and Path(self.load).expanduser().resolve() != Path(self.save).expanduser().resolve():
            check_no_overlap(self.save, {"--load": self.load})
        check_no_overlap(self.save, {"--teacher-load": self.teacher_load})

    # ------------------------------------------------------------------ derived values
    @property
    def iterations(self) -> int:
        """Training iterations (from train_iters, or train_tokens rounded up to whole global batches)."""
        if self.train_iters is not None:
            return self.train_iters
        return math.ceil(self.train_tokens / (self.global_batch_size * self.seq_length))

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.iterations

    @property
    def dtype(self) -> str:
        return PRECISION_DTYPES[self.precision]

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length

    def layout(self, world_size: int) -> "BatchLayout":
        """Data-parallel size and micro-batches per step for a job of `world_size` ranks."""
        mp = self.tp * self.pp
        if world_size % mp:
            raise ConfigError(f"world size {world_size} is not divisible by --tp x --pp = {self.tp} x {self.pp}")
        dp = world_size // mp
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by --micro-batch-size "
                f"{self.micro_batch_size} x data-parallel {dp} (world {world_size} = --tp {self.tp} x --pp {self.pp} "
                f"x dp {dp})")
        if self.sequence_parallel and self.tp > 1 and self.seq_length % self.tp:
            raise ConfigError(f"--sequence-parallel needs --seq-length {self.seq_length} divisible by --tp {self.tp}")
        return BatchLayout(dp=dp, num_microbatches=self.global_batch_size // (self.micro_batch_size * dp))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data_path"], d["valid_data_path"] = list(self.data_path), list(self.valid_data_path)
        return d

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a dict whose keys may use dashes; unknown keys are an error naming them all."""
        known = {f.name for f in dataclasses.fields(cls)}
        norm = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(k for k in norm if k not in known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        return cls(**norm)


def flag(name: str) -> str:
    """The command-line spelling of a setting: seq_length -> --seq-length."""
    return "--" + name.replace("_", "-")


def machine_defaults(has_cuda: bool) -> dict[str, Any]:
    """Defaults that depend on the machine (CPU_DEFAULTS without CUDA), to be overridden by the user's settings."""
    return {} if has_cuda else dict(CPU_DEFAULTS)


@dataclass(frozen=True)
class BatchLayout:
    dp: int
    num_microbatches: int


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return list(value)


def parse_blend(tokens: tuple[str, ...] | list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's --data-path: "P1 P2 ..." (weights from sizes) or "W1 P1 W2 P2 ..." (weighted blend)."""
    tokens = list(tokens)

    def is_number(t: str) -> bool:
        try:
            float(t)
            return True
        except ValueError:
            return False

    numeric = [is_number(t) for t in tokens]
    if not any(numeric):
        return tokens, None
    if len(tokens) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise ConfigError(f"data path {' '.join(tokens)!r}: expected prefixes, or weight/prefix pairs "
                          f"'W1 PREFIX1 W2 PREFIX2 ...'")
    weights = [float(t) for t in tokens[0::2]]
    if any(w <= 0 for w in weights):
        raise ConfigError(f"data path weights must be positive, got {weights}")
    return tokens[1::2], weights


def parse_split(split: str) -> list[float]:
    """Megatron's --split "train,valid,test" weights (normalised by megatron-core)."""
    try:
        parts = [float(x) for x in str(split).replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(f"--split {split!r}: expected comma-separated numbers like '969,30,1'") from None
    if len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0 or parts[0] <= 0:
        raise ConfigError(f"--split {split!r}: expected up to 3 non-negative weights with a positive train share")
    return parts + [0.0] * (3 - len(parts))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml, needs PyYAML) or JSON mapping of TrainConfig settings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data
