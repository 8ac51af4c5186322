"""HF checkpoint I/O: lazy, sliceable reads (safetensors single or sharded, pytorch_model*.bin), sharded
safetensors writes with an index, and tokenizer files carried along."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Iterable, Iterator

import torch

from megatron_prune.checkpoint.keys import hf_expected_shapes
from megatron_prune.errors import UserError
from megatron_prune.config.shape import LlamaShape, read_hf_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
SAFETENSORS_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class CheckpointError(UserError, ValueError):
    """A checkpoint on disk that is missing, truncated or inconsistent; the message names the file."""


class LazyTensor:
    """A tensor in a file, read only when (and as far as) it is sliced: `.shape`, `.dtype`, `t[a:b]`, `t[:, a:b]`."""

    def __init__(self, source, key: str, shape: tuple[int, ...], dtype: torch.dtype, path: Path):
        self._source, self.key, self.shape, self.dtype, self.path = source, key, tuple(shape), dtype, path

    def __getitem__(self, idx) -> torch.Tensor:
        try:
            return self._source(idx)
        except Exception as e:  # safetensors raises on truncated data only when the bytes are read
            raise CheckpointError(f"{self.path}: cannot read tensor {self.key!r} ({e})") from None

    def full(self) -> torch.Tensor:
        return self[:]


def _check_safetensors_file(path: Path) -> dict:
    """Parse the header and check that the file holds every byte it declares (catches truncated downloads)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors header ({size} bytes, header says {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, expected {8 + n + end})")
    return header


def _read_slice(path: Path, key: str, idx) -> torch.Tensor:
    """Open, slice, close: the file's mmap is unmapped after every read, so pages touched for one tensor do not
    stay in this process's resident set while the next output rank is built."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_slice(key)[idx]


class HFReader:
    """Lazy access to the tensors of an HF LLaMA directory. Use as a context manager."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: no such directory")
        self.config = read_hf_config(self.dir)
        self.shape = LlamaShape.from_hf_config(self.config)
        self._tensors: dict[str, LazyTensor] = {}
        self._open()

    def _open(self) -> None:
        """With an index, only the files it names are read and each tensor comes from the file it names (a stray
        extra file cannot shadow a tensor); without one, a tensor name found in two files is an error."""
        for index, pattern, open_file in ((SAFETENSORS_INDEX, "*.safetensors", self._open_safetensors),
                                          (BIN_INDEX, "pytorch_model*.bin", self._open_bin)):
            if (self.dir / index).is_file():
                return self._open_indexed(self.dir / index, open_file)
            files = sorted(self.dir.glob(pattern))
            if files:
                for path in files:
                    open_file(path, None)
                return
        raise CheckpointError(f"{self.dir}: no *.safetensors or pytorch_model*.bin weights found")

    def _open_indexed(self, index: Path, open_file) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: invalid index ({type(e).__name__}: {e})") from None
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise CheckpointError(f"{index}: names {name}, which does not exist")
            wanted = {k for k, f in weight_map.items() if f == name}
            open_file(path, wanted)
            absent = sorted(k for k in wanted if k not in self._tensors)
            if absent:
                raise CheckpointError(f"{path}: lacks {len(absent)} tensors that {index.name} places there, "
                                      f"e.g. {absent[:2]}")

    def _add(self, key: str, tensor: "LazyTensor", only: set[str] | None) -> None:
        if only is not None and key not in only:
            return  # the index places this name in another file: that one is the truth
        if key in self._tensors:
            raise CheckpointError(f"{tensor.path}: tensor {key!r} is also in {self._tensors[key].path} (which one "
                                  f"is meant? remove the stray file or add a {SAFETENSORS_INDEX})")
        self._tensors[key] = tensor

    def _open_safetensors(self, path: Path, only: set[str] | None) -> None:
        header = _check_safetensors_file(path)
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(meta["dtype"], torch.float32)
            self._add(key, LazyTensor(lambda idx, key=key: _read_slice(path, key, idx), key, meta["shape"], dtype,
                                      path), only)

    def _open_bin(self, path: Path, only: set[str] | None) -> None:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot load ({e})") from None
        for key, t in sd.items():
            self._add(key, LazyTensor(lambda idx, t=t: t[idx].clone(), key, t.shape, t.dtype, path), only)

    def check_shapes(self) -> None:
        """Every LLaMA tensor has the shape config.json implies (a hand-edited config must not convert)."""
        s = self.shape
        for key, want in hf_expected_shapes(s).items():
            if key in self._tensors and tuple(self._tensors[key].shape) != want:
                t = self._tensors[key]
                raise CheckpointError(
                    f"{t.path}: tensor {key!r} has shape {list(t.shape)}, but {self.dir / 'config.json'} implies "
                    f"{list(want)} (hidden={s.hidden_size}, heads={s.num_attention_heads}, kv_heads="
                    f"{s.num_query_groups}, head_dim={s.kv_channels}, intermediate={s.ffn_hidden_size}, vocab="
                    f"{s.vocab_size})")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def __getitem__(self, key: str) -> LazyTensor:
        if key not in self._tensors:
            raise CheckpointError(f"{self.dir}: tensor {key!r} not found in the checkpoint")
        return self._tensors[key]

    def close(self) -> None:
        self._tensors.clear()

    def __enter__(self) -> "HFReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def write_hf_checkpoint(out_dir: Path, config: dict, tensors: Iterable[tuple[str, torch.Tensor]],
                        max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write tensors (streamed) to model-0000k-of-0000n.safetensors files plus an index, and config.json."""
    out_dir = Path(out_dir)
    written: list[tuple[Path, list[str]]] = []
    for i, shard in enumerate(_shards(tensors, max_shard_bytes)):
        path = out_dir / f"model-{i + 1:05d}.safetensors"
        _save_shard(shard, path)
        written.append((path, list(shard)))
    final = _rename_shards(out_dir, written)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return final


def _save_shard(shard: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors reports I/O failures (a full disk) as its own SafetensorError: they become the OSError they are,
    which the writers' translate_write_errors turns into one line; the partial shard is removed."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file({k: v.contiguous() for k, v in shard.items()}, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        path.unlink(missing_ok=True)
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def _shards(tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[key] = t
        size += nbytes
    if shard:
        yield shard


def _rename_shards(out_dir: Path, written: list[tuple[Path, list[str]]]) -> list[Path]:
    if len(written) == 1:
        target = out_dir / "model.safetensors"
        written[0][0].rename(target)
        return [target]
    n = len(written)
    weight_map, total, final = {}, 0, []
    for i, (path, keys) in enumerate(written):
        target = out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        path.rename(target)
        final.append(target)
        total += target.stat().st_size
        weight_map.update({k: target.name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return final
