"""What training hands megatron-core is checked first (megatron_prune/data/indexed.py): an indexed dataset's
.idx/.bin pair, read back by megatron-core's own IndexedDataset as the reference when valid and refused in one
line when truncated or foreign; and a dataset index cache, which admits only complete plain integer .npy arrays
(megatron-core loads them with allow_pickle=True)."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from megatron_prune.data.indexed import DatasetFileError, check_index_cache, check_indexed_dataset, check_npy_array
from megatron_prune.data.preprocess import PreprocessConfig, preprocess

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "megatron_prune" / "data" / "samples"
MISTRAL_SP = REPO / "tests" / "data" / "mistral_tokenizer.model.v1"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("indexed")
    return preprocess(PreprocessConfig([str(SAMPLES / "heldout.jsonl")], str(MISTRAL_SP), str(out / "d"),
                                       append_eod=True, progress=False)).prefix


def _copy(prefix: str, tmp_path: Path) -> str:
    for ext in (".bin", ".idx"):
        (tmp_path / ("c" + ext)).write_bytes(Path(prefix + ext).read_bytes())
    return str(tmp_path / "c")


def test_a_valid_dataset_passes_and_agrees_with_megatron_core(dataset):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(dataset)
    assert check_indexed_dataset(dataset) == (len(ds.document_indices) - 1, int(ds.sequence_lengths.sum()))


@pytest.mark.parametrize("cut", [0, 20, 40, -8, -1])
def test_truncated_idx_is_refused(dataset, tmp_path, cut):
    prefix = _copy(dataset, tmp_path)
    idx = Path(prefix + ".idx")
    data = idx.read_bytes()
    idx.write_bytes(data[:cut] if cut > 0 else data[:len(data) + cut] if cut else b"")
    with pytest.raises(DatasetFileError, match=r"c\.idx: (truncated|not a Megatron)"):
        check_indexed_dataset(prefix)


def test_truncated_bin_and_a_foreign_bin_are_refused(dataset, tmp_path):
    prefix = _copy(dataset, tmp_path)
    data = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(data[:1000])
    with pytest.raises(DatasetFileError, match=r"c\.bin: 1000 bytes, .* truncated"):
        check_indexed_dataset(prefix)
    Path(prefix + ".bin").write_bytes(data + data)
    with pytest.raises(DatasetFileError, match="not its data"):
        check_indexed_dataset(prefix)


def test_garbage_and_corrupt_idx_are_refused(dataset, tmp_path):
    prefix = _copy(dataset, tmp_path)
    idx = Path(prefix + ".idx")
    good = idx.read_bytes()
    idx.write_bytes(os.urandom(len(good)))
    with pytest.raises(DatasetFileError, match="not a Megatron indexed-dataset index"):
        check_indexed_dataset(prefix)
    n = int(np.frombuffer(good[18:26], dtype=np.uint64)[0])  # sequence count
    bad = bytearray(good)
    bad[34 + 4 * n + 8 * 3] ^= 0x40  # a sequence pointer
    idx.write_bytes(bytes(bad))
    with pytest.raises(DatasetFileError, match="corrupt sequence lengths or pointers"):
        check_indexed_dataset(prefix)
    bad = bytearray(good)
    bad[9] = 2  # format version
    idx.write_bytes(bytes(bad))
    with pytest.raises(DatasetFileError, match="version 2"):
        check_indexed_dataset(prefix)


def test_index_cache_admits_only_complete_integer_arrays(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    np.save(cache / "a-document_index.npy", np.arange(10, dtype=np.int32))
    np.save(cache / "a-sample_index.npy", np.zeros((5, 2), dtype=np.int64))
    (cache / "a-description.txt").write_text("{}")
    check_index_cache(cache)
    check_index_cache(tmp_path / "absent")  # nothing cached yet

    cases = {
        "pickle": lambda p: p.write_bytes(pickle.dumps({"x": 1})),
        "object": lambda p: np.save(p, np.array([{"x": 1}], dtype=object), allow_pickle=True),
        "float": lambda p: np.save(p, np.zeros(3, dtype=np.float32)),
        "npz": lambda p: zipfile.ZipFile(p, "w").writestr("x.npy", b""),
        "truncated": lambda p: p.write_bytes((tmp_path / "full.npy").read_bytes()[:-5]),
    }
    np.save(tmp_path / "full.npy", np.arange(100, dtype=np.int64))
    for name, make in cases.items():
        path = tmp_path / f"{name}.npy"
        make(path)
        with pytest.raises(DatasetFileError, match=f"{name}.npy: "):
            check_npy_array(path)
    (cache / "b-shuffle_index.npy").write_bytes(pickle.dumps(1))
    with pytest.raises(DatasetFileError, match="b-shuffle_index.npy: not a plain .npy array"):
        check_index_cache(cache)
