"""Preprocessing: token ids read back through megatron-core's IndexedDataset equal the tokenizer
libraries' own encodings (sentencepiece / tokenizers used directly as the reference), for every
input format and worker count; user errors are one clear line and leave no output behind."""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

import megatron_prune.data.preprocess as pp
from megatron_prune.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from megatron_prune.data.tokenizers import TokenizerError, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "megatron_prune" / "data" / "samples"
MISTRAL_SP = REPO / "tests" / "data" / "mistral_tokenizer.model.v1"
PUNKT_IN_WHEEL = "llama_index/core/_static/nltk_cache/tokenizers/punkt_tab/english/"
EDGE_DOCS = [
    {"id": "empty", "text": ""},  # tokenizes to nothing: skipped
    {"id": "unicode", "text": "Ünïcödé — “curly quotes” and an emoji 😀.\nSecond line."},
    {"id": "presplit", "text": ["An already split sentence.", "", "And another one!"]},
]


def sample_texts(name: str = "train.jsonl", limit: int | None = None) -> list[str]:
    lines = (SAMPLES / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[:limit]]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    """A tiny SentencePiece BPE model trained on the sample, set up like LLaMA-2's (unk 0, bos 1,
    eos 2, byte fallback, whitespace kept as is: no normalisation hides a whitespace bug)."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("sp")
    lines = [line for t in sample_texts() for line in t.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out / "tiny"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return out / "tiny.model"


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny byte-level BPE HF tokenizer directory (LLaMA-3 style special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample_texts(), trainer)
    # LLaMA-3's tokenizer.json adds BOS in its post-processor: encode() must not.
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>"}))
    return out


class RefTokenizer:
    """The reference: the tokenizer library itself, not megatron_prune's wrapper."""

    def __init__(self, path: Path) -> None:
        if path.is_dir():
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_file(str(path / "tokenizer.json"))
            self.eod = self._hf.token_to_id("<|end_of_text|>")
        else:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(path))
            self.eod = self._sp.eos_id()
        self.is_hf = path.is_dir()

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids if self.is_hf else self._sp.encode(text)


@pytest.fixture(scope="session")
def punkt_root(tmp_path_factory) -> str:
    """NLTK punkt_tab data: found where the library looks, or extracted (English only) from a
    llama-index-core wheel already present in REPO/.whl/ or $LLAMA_INDEX_CORE_WHEEL."""
    try:
        return pp.find_punkt()
    except PreprocessError:
        pass
    wheels = sorted(glob.glob(str(REPO / ".whl" / "llama_index_core-*.whl")))
    wheels += [os.environ["LLAMA_INDEX_CORE_WHEEL"]] if os.environ.get("LLAMA_INDEX_CORE_WHEEL") else []
    if not wheels:
        pytest.skip("no NLTK punkt_tab data (set NLTK_DATA, or put a llama_index_core wheel in .whl/)")
    root = tmp_path_factory.mktemp("nltk_data")
    with zipfile.ZipFile(wheels[-1]) as zf:
        for name in zf.namelist():
            if name.startswith(PUNKT_IN_WHEEL) and not name.endswith("/"):
                target = root / "tokenizers" / "punkt_tab" / "english" / name[len(PUNKT_IN_WHEEL):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
    return str(root)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def jsonl_input(tmp_path: Path, suffix: str = ".jsonl") -> tuple[list[Path], list[str | list[str]]]:
    """Two input files (sample docs with extra keys, then edge cases) and their documents."""
    recs = [{"id": i, "meta": {"x": 1}, "text": t} for i, t in enumerate(sample_texts(limit=25))]
    files = [write_jsonl(tmp_path / f"a{suffix}", recs), write_jsonl(tmp_path / f"b{suffix}", EDGE_DOCS)]
    return files, [r["text"] for r in recs + EDGE_DOCS]


def txt_input(tmp_path: Path) -> tuple[list[Path], list[str]]:
    """Hard-wrapped paragraphs, separated by blank (one whitespace-only) lines: one document each."""
    paras = [p for t in sample_texts(limit=6) for p in t.split("\n\n")][:30]
    docs = [textwrap.fill(p, 70) for p in paras]
    docs[3] = textwrap.indent(docs[3], "    ")  # indentation is part of the document
    body = "\n\n".join(docs[:10]) + "\n   \n\n" + "\n\n".join(docs[10:]) + "\n"
    path = tmp_path / "c.txt"
    path.write_text(body, encoding="utf-8")
    return [path], docs


def expected_sequences(ref: RefTokenizer, docs, append_eod: bool, split=None) -> list[list[list[int]]]:
    """Per non-empty document, its sequences of ids, EOD on the last one. As in Megatron-LM, a
    list-valued document is already split (one sequence per item, even without sentence splitting)."""
    out = []
    for doc in docs:
        sentences = doc if isinstance(doc, list) else (split(doc) if split else [doc])
        seqs = [ids for ids in (ref.encode(s) for s in sentences) if ids]
        if seqs:
            if append_eod:
                seqs[-1] = seqs[-1] + [ref.eod]
            out.append(seqs)
    return out


def read_back(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    seqs = [ds[i].tolist() for i in range(len(ds))]
    bounds = ds.document_indices.tolist()
    return ds, [seqs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def only_inputs_left(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir())


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst", "txt"])
def test_roundtrip_matches_tokenizer(tmp_path, sp_model, fmt, workers):
    if fmt == "jsonl.zst":
        pytest.importorskip("zstandard", reason="pip install zstandard for .zst input")
    files, docs = txt_input(tmp_path) if fmt == "txt" else jsonl_input(tmp_path, "." + fmt)
    stats = preprocess(PreprocessConfig([str(f) for f in files], str(sp_model), str(tmp_path / "out" / "ds"),
                                        append_eod=True, workers=workers, progress=False))
    assert stats.prefix == str(tmp_path / "out" / "ds_text_document")
    ds, got = read_back(stats.prefix)
    want = expected_sequences(RefTokenizer(sp_model), docs, append_eod=True)
    assert got == want
    assert ds.index.dtype == np.uint16  # vocab 400 < 65500
    assert stats.documents == len(want) and stats.tokens == sum(len(seq) for d in want for seq in d)
    assert stats.skipped_empty == (1 if fmt != "txt" else 0)
    assert only_inputs_left(tmp_path / "out") == ["ds_text_document.bin", "ds_text_document.idx"]


@pytest.mark.parametrize("workers", [1, 2])
def test_hf_tokenizer_dir_roundtrip_without_eod(tmp_path, hf_dir, workers):
    files, docs = jsonl_input(tmp_path)
    stats = preprocess(PreprocessConfig([str(f) for f in files], str(hf_dir), str(tmp_path / "hf"),
                                        workers=workers, progress=False))
    _, got = read_back(stats.prefix)
    ref = RefTokenizer(hf_dir)
    assert got == expected_sequences(ref, docs, append_eod=False)
    assert all(ref.eod not in seq for doc in got for seq in doc)


def test_real_llama2_style_tokenizer(tmp_path):
    """mistral-common's tokenizer.model.v1: a real 32000-token LLaMA-2 style SentencePiece model."""
    files, docs = jsonl_input(tmp_path)
    tok = load_tokenizer(MISTRAL_SP)
    assert (tok.vocab_size, tok.bos, tok.eod) == (32000, 1, 2)
    stats = preprocess(PreprocessConfig([str(f) for f in files], str(MISTRAL_SP), str(tmp_path / "m"),
                                        append_eod=True, progress=False))
    ds, got = read_back(stats.prefix)
    ref = RefTokenizer(MISTRAL_SP)
    assert got == expected_sequences(ref, docs, append_eod=True)
    assert tok.decode(got[0][0][:-1]) == docs[0]  # the sample is plain text: lossless for this model


def test_sentence_splitting_one_sequence_per_sentence(tmp_path, sp_model, punkt_root, monkeypatch):
    import nltk
    from nltk.tokenize import _get_punkt_tokenizer, sent_tokenize

    monkeypatch.setattr(nltk.data, "path", [punkt_root])
    _get_punkt_tokenizer.cache_clear()
    files, docs = jsonl_input(tmp_path)
    monkeypatch.setenv("NLTK_DATA", punkt_root)
    stats = preprocess(PreprocessConfig([str(f) for f in files], str(sp_model), str(tmp_path / "s"),
                                        append_eod=True, workers=2, split_sentences=True, progress=False))
    _get_punkt_tokenizer.cache_clear()
    assert stats.prefix.endswith("s_text_sentence")
    _, got = read_back(stats.prefix)
    want = expected_sequences(RefTokenizer(sp_model), docs, append_eod=True, split=sent_tokenize)
    assert got == want
    assert sum(len(d) for d in got) > 5 * len(got)  # really split: many sentences per document
    assert stats.sequences == sum(len(d) for d in got)


def test_gpt_dataset_reads_output_with_our_tokenizer(tmp_path, sp_model):
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    files, _ = jsonl_input(tmp_path)
    stats = preprocess(PreprocessConfig([str(f) for f in files], str(sp_model), str(tmp_path / "g"),
                                        append_eod=True, progress=False))
    ds, _ = read_back(stats.prefix)
    tok = load_tokenizer(sp_model)
    cfg = GPTDatasetConfig(random_seed=1, sequence_length=32, blend=None, split="1,0,0", tokenizer=tok,
                           reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                           path_to_cache=None, mid_level_dataset_surplus=0.005)
    gpt = GPTDataset(ds, stats.prefix, np.arange(len(ds)), 50, Split.train, cfg)
    sample = gpt[0]
    assert sample["tokens"].shape == (32,)
    assert bool((sample["labels"][:-1] == sample["tokens"][1:]).all())
    assert bool((sample["loss_mask"] == 1).all())  # no real token mistaken for padding


# ---------------------------------------------------------------- errors leave nothing behind


def run_error(tmp_path: Path, inputs, tokenizer, **kw) -> str:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(PreprocessError) as err:
        preprocess(PreprocessConfig([str(i) for i in inputs], str(tokenizer), str(out / "ds"),
                                    progress=False, **kw))
    assert only_inputs_left(out) == []
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("workers", [1, 2])
def test_missing_json_key(tmp_path, sp_model, workers):
    f = write_jsonl(tmp_path / "k.jsonl", [{"text": "fine"}, {"body": "no text here", "id": 3}])
    msg = run_error(tmp_path, [f], sp_model, workers=workers)
    assert msg.startswith(f"{f}:2: missing JSON key 'text'") and "'body'" in msg


@pytest.mark.parametrize("workers", [1, 2])
def test_empty_input_file(tmp_path, sp_model, workers):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "some text"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    msg = run_error(tmp_path, [good, empty], sp_model, workers=workers)
    assert msg == f"{empty}: no documents (empty input file)"


def test_invalid_json(tmp_path, sp_model):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b",\n')
    assert run_error(tmp_path, [f], sp_model).startswith(f"{f}:3: invalid JSON")


def test_missing_input_and_empty_glob(tmp_path, sp_model):
    assert run_error(tmp_path, [tmp_path / "nope.jsonl"], sp_model) == f"{tmp_path / 'nope.jsonl'}: no such input file"
    assert "no input files match" in run_error(tmp_path, [tmp_path / "*.jsonl"], sp_model)


def test_bad_tokenizer_path(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    missing = tmp_path / "no_such_tokenizer.model"
    msg = run_error(tmp_path, [f], missing)
    assert str(missing) in msg and "expected a SentencePiece .model file or an HF tokenizer directory" in msg
    msg = run_error(tmp_path, [f], f)  # a file that is not a model
    assert f"tokenizer {f} is not a SentencePiece .model file" in msg
    with pytest.raises(TokenizerError, match="holds none of tokenizer.json"):
        load_tokenizer(tmp_path / "out")


def test_append_eod_needs_an_eos_token(tmp_path, hf_dir):
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    (no_eos / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    assert "defines no EOS token" in run_error(tmp_path, [f], no_eos, append_eod=True)


def test_zst_without_zstandard(tmp_path, sp_model, monkeypatch):
    f = tmp_path / "a.jsonl.zst"
    f.write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` fail
    assert "pip install zstandard" in run_error(tmp_path, [f], sp_model)


def test_missing_punkt_data_explains_how_to_get_it(tmp_path, sp_model, monkeypatch):
    monkeypatch.setattr(pp, "_punkt_candidate_roots", lambda: [str(tmp_path / "empty_nltk_data")])
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "One. Two."}])
    msg = run_error(tmp_path, [f], sp_model, split_sentences=True)
    assert "punkt_tab" in msg and "NLTK_DATA" in msg and "pip install llama-index-core" in msg


def test_nltk_data_env_is_read_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("NLTK_DATA", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    assert pp._punkt_candidate_roots()[:2] == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_existing_output_needs_overwrite(tmp_path, sp_model):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "first"}])
    cfg = PreprocessConfig([str(f)], str(sp_model), str(tmp_path / "o"), progress=False)
    preprocess(cfg)
    with pytest.raises(PreprocessError, match="exists .*--overwrite"):
        preprocess(cfg)
    write_jsonl(f, [{"text": "second, longer document"}])
    preprocess(PreprocessConfig([str(f)], str(sp_model), str(tmp_path / "o"), overwrite=True, progress=False))
    _, got = read_back(str(tmp_path / "o_text_document"))
    assert got == [[RefTokenizer(sp_model).encode("second, longer document")]]


def test_all_documents_empty(tmp_path, sp_model):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": ""}, {"text": ""}])
    assert "no tokens" in run_error(tmp_path, [f], sp_model)


# ---------------------------------------------------------------- tokenizer interface


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_tokenizer_interface(kind, sp_model, hf_dir):
    path = sp_model if kind == "sp" else hf_dir
    tok, ref = load_tokenizer(path), RefTokenizer(path)
    text = "Botchan went to Shikoku. He did not like it."
    assert tok.encode(text) == ref.encode(text) == tok.tokenize(text)
    assert tok.eod == ref.eod and tok.bos is not None and tok.bos not in tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == (400 if kind == "sp" else 500)
    assert tok.unique_identifiers["path"] == str(Path(path).resolve())
    assert not hasattr(tok, "pad")  # megatron-core then picks a pad id that never occurs


# ---------------------------------------------------------------- CLI and shell wrapper


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_prune", "preprocess", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, **kw)


def test_cli_help():
    res = run_cli("--help")
    assert res.returncode == 0
    for flag in ("--input", "--json-key", "--tokenizer", "--output-prefix", "--append-eod", "--workers",
                 "--split-sentences", "--overwrite"):
        assert flag in res.stdout


def test_cli_user_error_is_one_line(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    res = run_cli("--input", str(f), "--tokenizer", str(tmp_path / "missing"), "--output-prefix",
                  str(tmp_path / "o"))
    assert res.returncode == 2
    assert res.stderr.startswith("error: tokenizer path") and res.stderr.count("\n") == 1
    assert "Traceback" not in res.stderr


def test_shell_wrapper_syntax_and_help():
    script = REPO / "tools" / "preprocess_data.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0
    assert "SPLIT_SENTENCES" in res.stdout and "--output-prefix" in res.stdout


def test_sample_files_are_disjoint_and_small():
    train, held = set(sample_texts("train.jsonl")), set(sample_texts("heldout.jsonl"))
    assert train and held and not train & held
    for f in SAMPLES.iterdir():
        assert f.stat().st_size < 1_000_000
    assert (SAMPLES / "README.md").is_file()


# ---------------------------------------------------------------- compressed input: to its end, or refused (issue 26)


def _zst_inputs(tmp_path: Path) -> tuple[Path, bytes]:
    """The sample as jsonl and its zstd compression with a block flushed after every line (so a cut at a block
    boundary leaves whole lines: exactly what was accepted before, as if the corpus were shorter)."""
    import zstandard

    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": t} for t in sample_texts(limit=60)])
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(write_checksum=True).stream_writer(buf, closefd=False) as w:
        for line in plain.read_bytes().splitlines(keepends=True):
            w.write(line)
            w.flush(zstandard.FLUSH_BLOCK)
    return plain, buf.getvalue()


@pytest.mark.parametrize("cut", [0.5, 0.9, -4, -1])
def test_truncated_zst_is_refused_in_one_line(tmp_path, sp_model, cut, capsys):
    from megatron_prune.__main__ import main

    pytest.importorskip("zstandard")
    _, data = _zst_inputs(tmp_path)
    bad = tmp_path / "cut.jsonl.zst"
    bad.write_bytes(data[:int(len(data) * cut)] if cut > 0 else data[:cut])
    rc = main(["preprocess", "--input", str(bad), "--tokenizer", str(sp_model), "--output-prefix",
               str(tmp_path / "out" / "ds"), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {bad}: truncated zstd file"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["garbage", "corrupt", "trailing"])
def test_non_zstd_or_corrupt_zst_is_one_line(tmp_path, sp_model, kind, capsys):
    from megatron_prune.__main__ import main

    pytest.importorskip("zstandard")
    _, data = _zst_inputs(tmp_path)
    bad = tmp_path / f"{kind}.txt.zst"
    if kind == "garbage":
        bad.write_bytes(b"this is plain text, not zstd\n" * 20)
    elif kind == "corrupt":
        mid = len(data) // 2
        bad.write_bytes(data[:mid] + bytes(b ^ 0x5A for b in data[mid:mid + 64]) + data[mid + 64:])
    else:
        bad.write_bytes(data + b"junk")
    rc = main(["preprocess", "--input", str(bad), "--tokenizer", str(sp_model), "--output-prefix",
               str(tmp_path / "ds"), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {bad}: "), err
    assert {"garbage": "is not zstd-compressed", "corrupt": "corrupt zstd", "trailing": "after its last zstd frame"
            }[kind] in err[0]


@pytest.mark.parametrize("writer", ["zstd", "pzstd", "concatenated"])
def test_every_zstd_frame_is_read(tmp_path, sp_model, writer):
    """Files the zstd tools write (zstd --check; pzstd's frame behind a skippable frame) and two compressed files
    concatenated: the same documents as the uncompressed file (the frame walk of check_zstd_complete must
    accept every frame layout the decompressor reads)."""
    import shutil
    import subprocess as sp

    zstandard = pytest.importorskip("zstandard")
    plain, _ = _zst_inputs(tmp_path)
    packed = tmp_path / "packed.jsonl.zst"
    if writer == "concatenated":
        lines = plain.read_bytes().splitlines(keepends=True)
        half = len(lines) // 2
        packed.write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines[:half]))
                           + zstandard.ZstdCompressor().compress(b"".join(lines[half:])))
    else:
        if shutil.which(writer) is None:
            pytest.skip(f"no {writer} command")
        extra = ["-p", "2"] if writer == "pzstd" else ["--check"]
        sp.run([writer, "-q", *extra, str(plain), "-o", str(packed)], check=True)
    ref = preprocess(PreprocessConfig([str(plain)], str(sp_model), str(tmp_path / "ref"), progress=False))
    got = preprocess(PreprocessConfig([str(packed)], str(sp_model), str(tmp_path / "got"), progress=False))
    assert got.documents == ref.documents == 60
    assert read_back(got.prefix)[1] == read_back(ref.prefix)[1]


def test_a_second_preprocess_into_the_same_prefix_is_refused(tmp_path, sp_model, capsys):
    """Two runs into one prefix, neither with --overwrite, both passed the existence check and both exited 0,
    one replacing the other's output (a .bin of one corpus could meet the .idx of the other). The prefix is locked
    like every other output now: the second run is refused at once."""
    from megatron_prune.__main__ import main
    from megatron_prune.checkpoint.lock import output_lock

    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in sample_texts(limit=3)])
    prefix = tmp_path / "out" / "ds"
    with output_lock(pp.output_prefix(str(prefix))):  # as a first run holds it while it writes
        rc = main(["preprocess", "--input", str(src), "--tokenizer", str(sp_model), "--output-prefix", str(prefix),
                   "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is locked by" in err[0] and f"pid {os.getpid()}" in err[0], err
    assert only_inputs_left(tmp_path / "out") == []
    assert main(["preprocess", "--input", str(src), "--tokenizer", str(sp_model), "--output-prefix", str(prefix),
                 "--workers", "1", "--no-progress"]) == 0  # released: the next run works, and leaves no lock file
    assert only_inputs_left(tmp_path / "out") == ["ds_text_document.bin", "ds_text_document.idx"]
