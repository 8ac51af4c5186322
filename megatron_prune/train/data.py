"""Training data: megatron-core GPTDataset through BlendedMegatronDatasetBuilder, and global batches cut into
this data-parallel rank's micro-batches.

Sample order depends only on the seed, the blend and the split: global batch `i` is samples
[i * gbs, (i + 1) * gbs) of the train dataset whatever the DP size, and DP rank r takes micro-batch
slices of it the way Megatron-LM's MegatronPretrainingSampler does. The data position for resume is
therefore one number, the consumed train samples (= iteration * gbs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_prune.data.indexed import check_index_cache, check_indexed_dataset
from megatron_prune.errors import InputError
from megatron_prune.train.config import ConfigError, TrainConfig, parse_blend, parse_split

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
INDEX_CACHE_NAME = "dataset_cache"  # inside --save


@dataclass(frozen=True)
class DataSplits:
    train: Any            # GPTDataset or BlendedDataset
    valid: Any | None     # None when there is no validation data or eval_iters == 0


def _check_prefixes(prefixes: list[str]) -> None:
    missing = [p for p in prefixes if not (Path(p + ".bin").is_file() and Path(p + ".idx").is_file())]
    if missing:
        raise InputError(f"indexed dataset(s) not found: {', '.join(missing)} (expected PREFIX.bin and "
                                f"PREFIX.idx, e.g. written by `python -m megatron_prune preprocess`)")
    for prefix in prefixes:
        check_indexed_dataset(prefix)


def check_data_paths(cfg: TrainConfig) -> None:
    """Fail early (before building models): a dataset prefix missing, truncated or corrupt; an index cache holding
    anything but plain arrays."""
    _check_prefixes(parse_blend(cfg.data_path)[0])
    if cfg.valid_data_path:
        _check_prefixes(parse_blend(cfg.valid_data_path)[0])
    if index_cache_dir(cfg):
        check_index_cache(index_cache_dir(cfg))


def index_cache_dir(cfg: TrainConfig) -> str:
    """Where megatron-core caches the dataset indices: --data-cache-path, else SAVE/dataset_cache (this run's own
    folder), else "" (built in memory by every rank). Never beside the data, megatron-core's default: a data
    folder is an input (it may be read-only or shared, and a cache file planted there would be unpickled)."""
    if cfg.data_cache_path:
        return cfg.data_cache_path
    return str(Path(cfg.save) / INDEX_CACHE_NAME) if cfg.save else ""


def dataset_config(cfg: TrainConfig, tokenizer) -> Any:
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    train_blend = parse_blend(cfg.data_path)
    common = dict(random_seed=cfg.seed, sequence_length=cfg.seq_length, tokenizer=tokenizer,
                  reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=cfg.eod_mask_loss,
                  create_attention_mask=False, path_to_cache=index_cache_dir(cfg))
    if cfg.valid_data_path:
        valid_blend = parse_blend(cfg.valid_data_path)
        return GPTDatasetConfig(blend_per_split=[train_blend, valid_blend, None], **common)
    split = ",".join(str(x) for x in parse_split(cfg.split))
    return GPTDatasetConfig(blend=train_blend, split=split, **common)


def build_datasets(cfg: TrainConfig, tokenizer) -> DataSplits:
    """Train and validation datasets sized for the whole run (every rank builds; rank 0 writes the index cache
    first, megatron-core's builder orders that with a barrier)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    ds_cfg = dataset_config(cfg, tokenizer)
    has_valid = bool(cfg.valid_data_path) or parse_split(cfg.split)[1] > 0
    valid_samples = cfg.eval_iters * cfg.global_batch_size if has_valid and cfg.eval_iters else None
    sizes = [cfg.skip_samples + cfg.iterations * cfg.global_batch_size, valid_samples, None]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, ds_cfg).build()
    if train is None or len(train) < sizes[0]:
        skip = f" after --skip-samples {cfg.skip_samples}" if cfg.skip_samples else ""
        raise ConfigError(f"train dataset has {0 if train is None else len(train)} samples, the run needs "
                          f"{sizes[0]} (iterations {cfg.iterations} x global batch {cfg.global_batch_size}{skip})")
    if valid_samples and (valid is None or len(valid) < valid_samples):
        have = 0 if valid is None else len(valid)
        raise ConfigError(f"validation split has {have} samples of {cfg.seq_length} tokens, evaluation needs "
                          f"{valid_samples} (eval_iters {cfg.eval_iters} x global batch {cfg.global_batch_size}); "
                          f"raise the valid share of --split or lower --eval-iters")
    return DataSplits(train=train, valid=valid if valid_samples else None)


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is cut: sizes and this rank's place in the data-parallel group."""

    global_batch_size: int
    micro_batch_size: int
    dp: int
    dp_rank: int

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    def sample_indices(self, first_sample: int) -> list[list[int]]:
        """Dataset indices of this rank's micro-batches of the global batch starting at `first_sample`."""
        mbs, dp = self.micro_batch_size, self.dp
        out = []
        for j in range(self.num_microbatches):
            start = first_sample + j * mbs * dp + self.dp_rank * mbs
            out.append(list(range(start, start + mbs)))
        return out


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in BATCH_KEYS}


def micro_batches(dataset, plan: BatchPlan, first_sample: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches ({tokens, labels, loss_mask, position_ids}, each [mbs, seq]) of one global batch."""
    return [collate([dataset[i] for i in idx]) for idx in plan.sample_indices(first_sample)]
