"""Vocabulary pruning: counts, tokenizer surgery (SentencePiece, HF tokenizer.json), HF and Megatron checkpoints.

References: the original tokenizer (its ids mapped through the saved id map), sentencepiece / tokenizers
themselves for the toy merge cases, and transformers' LlamaForCausalLM for the pruned HF model's logits.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from megatron_prune.__main__ import main
from megatron_prune.data.tokenizers import load_tokenizer
from megatron_prune.vocab import hf_tokenizer, spm
from megatron_prune.errors import UserError
from megatron_prune.vocab.counts import TokenCounts, count_tokens, write_counts
from megatron_prune.vocab.plan import plan_vocab
from megatron_prune.vocab.run import VOCAB_MAP, prune_vocab
from megatron_prune.vocab.slice import VocabMap, slice_vocab_shards
from megatron_prune.vocab.tokenizer_files import TokenizerSource
from tests.helpers import make_hf_model

SAMPLES = Path(__file__).resolve().parents[2] / "megatron_prune" / "data" / "samples"
REAL_SPM = Path(__file__).resolve().parents[1] / "data" / "mistral_tokenizer.model.v1"
DROPPED_TEXT = "Xylophone 日本語 naïve façade 🙂 ZZZ qwxj"


def texts(name: str) -> list[str]:
    return [json.loads(line)["text"] for line in (SAMPLES / name).read_text().splitlines() if line.strip()]


def train_spm(path: Path, vocab_size: int = 1000, model_type: str = "bpe", byte_fallback: bool = True,
              docs: int | None = None) -> Path:
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts("train.jsonl")[:docs]), model_writer=out, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=byte_fallback, normalization_rule_name="identity", character_coverage=1.0,
        max_sentence_length=100000, minloglevel=2)
    path.write_bytes(out.getvalue())
    return path


def train_byte_level_bpe(path: Path, vocab_size: int = 1000) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts("train.jsonl"), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
                            ).save_pretrained(path)
    return path


def llama2_style_dir(path: Path, spm_model: Path) -> Path:
    """tokenizer.model plus transformers' own tokenizer.json conversion of it, as LLaMA-2 HF repos ship."""
    from transformers import LlamaTokenizer

    src = path.parent / f"{path.name}-src"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(spm_model.read_bytes())
    LlamaTokenizer.from_pretrained(src).save_pretrained(path)
    (path / "tokenizer.model").write_bytes(spm_model.read_bytes())
    return path


def make_counts(tokenizer: Path, out: Path) -> Path:
    write_counts(out, count_tokens(tokenizer, [str(SAMPLES / "train.jsonl")], progress=False))
    return out


def kept_only_text(old, kept: set[int], byte_level: bool) -> tuple[str, int]:
    """Held-out words whose original tokens are all kept, as (text, number of words). Byte-level BPE splits a word
    with its leading space (" word"), SentencePiece with its "▁" (as `word` alone is encoded)."""
    form = (lambda w: " " + w) if byte_level else (lambda w: w)
    words = [w for t in texts("heldout.jsonl") for w in t.split() if set(old.encode(form(w))) <= kept]
    return ("" if byte_level else " ").join(form(w) for w in words), len(words)


def vocab_map(save: Path) -> VocabMap:
    return VocabMap.from_json(json.loads((save / VOCAB_MAP).read_text()))


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toks")
    spm_path = train_spm(root / "bpe.model")
    return {"spm-bpe": spm_path, "spm-real": REAL_SPM, "hf-bytelevel": train_byte_level_bpe(root / "bytelevel"),
            "llama2-dir": llama2_style_dir(root / "llama2", spm_path)}


# ----------------------------------------------------------------------------- counts
def test_counts_equal_an_independent_count(toks, tmp_path):
    import sentencepiece

    got = count_tokens(toks["spm-bpe"], [str(SAMPLES / "heldout.jsonl")], workers=2, progress=False,
                       batch_bytes=20_000)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(toks["spm-bpe"]))
    want = Counter(i for t in texts("heldout.jsonl") for i in sp.encode(t))
    assert got.documents == len(texts("heldout.jsonl"))
    assert {i: c for i, c in enumerate(got.counts) if c} == dict(want)
    assert got.tokenizer["vocab_size"] == 1000


# ----------------------------------------------------------------------------- tokenizer surgery
@pytest.mark.parametrize("kind,keep", [("spm-bpe", 300), ("spm-real", 2000), ("hf-bytelevel", 300),
                                       ("llama2-dir", 300)])
def test_kept_text_keeps_mapped_ids_and_dropped_text_still_encodes(toks, tmp_path, kind, keep):
    tok = toks[kind]
    res = prune_vocab(make_counts(tok, tmp_path / "c.json"), keep, tok, tmp_path / "out", progress=False)
    vmap = vocab_map(tmp_path / "out")
    assert vmap == res.vmap and vmap.new_size == res.stats["vocab_size"] == keep
    old = load_tokenizer(tok)
    new = load_tokenizer(tmp_path / "out" / "tokenizer.model" if kind.startswith("spm") else tmp_path / "out")
    assert new.vocab_size == vmap.new_size
    text, n_words = kept_only_text(old, set(vmap.kept), byte_level=kind == "hf-bytelevel")
    old_ids = old.encode(text)
    assert n_words > 2000 and set(old_ids) <= set(vmap.kept)  # the check below is not vacuous
    assert new.encode(text) == vmap.map_ids(old_ids)
    assert (new.bos, new.eos) == tuple(vmap.map_ids([old.bos, old.eos]))
    for t in [DROPPED_TEXT, texts("heldout.jsonl")[0]]:  # dropped tokens fall back to bytes: lossless
        ids = new.encode(t)
        assert max(ids) < vmap.new_size and new.decode(ids) == t
    assert not set(vmap.map_ids(vmap.kept)) - set(range(vmap.new_size))


def test_llama2_dir_prunes_both_files_consistently(toks, tmp_path):
    import sentencepiece

    tok = toks["llama2-dir"]
    prune_vocab(make_counts(tok, tmp_path / "c.json"), 300, tok, tmp_path / "out", progress=False)
    hf = load_tokenizer(tmp_path / "out")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    for t in texts("heldout.jsonl")[:10] + [DROPPED_TEXT]:
        assert hf.encode(t) == sp.encode(t)


def test_unigram_without_byte_fallback(tmp_path):
    """Unigram needs no merge closure; without byte fallback, dropped text becomes <unk> (no error)."""
    tok = train_spm(tmp_path / "nofb.model", vocab_size=400, model_type="unigram", byte_fallback=False, docs=30)
    res = prune_vocab(make_counts(tok, tmp_path / "c.json"), 100, tok, tmp_path / "out", progress=False)
    old, new = load_tokenizer(tok), load_tokenizer(tmp_path / "out" / "tokenizer.model")
    assert res.stats["merge_closure_added"] == 0
    text, n_words = kept_only_text(old, set(res.vmap.kept), byte_level=False)
    assert n_words > 2000 and new.encode(text) == res.vmap.map_ids(old.encode(text))
    ids = new.encode(DROPPED_TEXT)
    assert new._sp.unk_id() in ids and max(ids) < new.vocab_size


def _toy_spm(pieces: list[tuple[str, float]]):
    model = spm.model_proto_class()()
    model.trainer_spec.model_type = spm.BPE
    model.trainer_spec.vocab_size = len(pieces) + 3
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = False
    for piece, score, kind in [("<unk>", 0, spm.UNKNOWN), ("<s>", 0, spm.CONTROL), ("</s>", 0, spm.CONTROL)] + [
            (p, s, spm.NORMAL) for p, s in pieces]:
        model.pieces.add(piece=piece, score=score, type=kind)
    return model


def _encode(model, text: str) -> list[str]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model.SerializeToString())
    return sp.encode(text, out_type=str)


def test_spm_closure_keeps_the_pieces_a_kept_piece_is_built_through():
    model = _toy_spm([("ab", -1.0), ("abc", -2.0), ("a", -3.0), ("b", -4.0), ("c", -5.0), ("bc", -6.0)])
    assert _encode(model, "abc") == ["abc"]
    abc = 4
    assert spm.merge_closure(model, {abc}) == {abc, 3}  # "ab": abc = ab + c ("bc" scores lower than "ab")
    without = spm.prune_model(model, [0, 1, 2, 4, 5, 6, 7])  # "ab" (and "bc") dropped: "abc" is unreachable
    assert _encode(without, "abc") != ["abc"]
    closed = spm.prune_model(model, sorted(spm.merge_closure(model, {0, 1, 2, abc, 5, 6, 7})))
    assert _encode(closed, "abc") == ["abc"]


def test_hf_closure_keeps_characters_and_intermediates():
    tj = {"added_tokens": [], "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4},
                                        "merges": ["a b", "ab c"], "byte_fallback": False}}
    assert hf_tokenizer.merge_closure(tj, {4}) == {0, 1, 2, 3, 4}
    pruned = hf_tokenizer.prune_tokenizer_json(tj, VocabMap(5, (0, 1, 2, 4)))
    assert pruned["model"]["vocab"] == {"a": 0, "b": 1, "c": 2, "abc": 3} and pruned["model"]["merges"] == []


def test_hf_added_tokens_at_the_end_move_with_their_ids(tmp_path):
    """LLaMA-3 layout: special tokens after the BPE vocabulary, a post-processor that adds BOS by id."""
    from tokenizers import Tokenizer, processors

    src = train_byte_level_bpe(tmp_path / "src", vocab_size=600)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.add_special_tokens(["<|begin|>", "<|end|>"])
    begin = tok.token_to_id("<|begin|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", begin)])
    tok.save(str(src / "tokenizer.json"))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {str(begin): {"content": "<|begin|>", "special": True}}
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    res = prune_vocab(make_counts(src, tmp_path / "c.json"), 300, src, tmp_path / "out", progress=False)
    new_begin = res.vmap.map_ids([begin])[0]
    assert begin == 600 and new_begin == res.vmap.new_size - 2
    pruned = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert pruned.encode("the and the").ids[0] == new_begin == pruned.token_to_id("<|begin|>")
    assert pruned.encode("the and the").ids[1:] == res.vmap.map_ids(tok.encode("the and the").ids[1:])
    out_cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert list(out_cfg["added_tokens_decoder"]) == [str(new_begin)]


# ----------------------------------------------------------------------------- slicing
def test_slice_vocab_shards_against_explicit_rows():
    old, tp, hidden = 300, 2, 4
    full = torch.randn(old, hidden)
    shards = [torch.cat([full, torch.zeros(84, hidden)])[r * 192:(r + 1) * 192] for r in range(tp)]
    kept = (0, 5, 7, 150, 299)
    got = slice_vocab_shards(shards, old, VocabMap(old, kept), new_padded=8)
    assert [s.shape[0] for s in got] == [4, 4]
    assert torch.equal(got[0], torch.stack([full[0], full[5], full[7], full[150]]))
    assert torch.equal(got[1][0], full[299]) and not got[1][1:].any()


# ----------------------------------------------------------------------------- checkpoints
PAD = 500  # a config-named id in the middle of the vocabulary: kept and renumbered


@pytest.fixture(scope="module")
def ckpts(toks, tmp_path_factory):
    from megatron_prune.checkpoint.convert_files import hf_to_megatron

    root = tmp_path_factory.mktemp("vocab_ckpt")
    counts = make_counts(toks["spm-bpe"], root / "counts.json")
    out = {"counts": counts, "root": root}
    for tied in (False, True):
        hf = root / f"hf-tied{tied}"
        make_hf_model(hf, seed=3, vocab_size=1000, tie_word_embeddings=tied, pad_token_id=PAD)
        (hf / "tokenizer.model").write_bytes(toks["spm-bpe"].read_bytes())
        out[f"hf-tied{tied}"] = hf
        tp, pp = (1, 2) if tied else (2, 1)
        hf_to_megatron(hf, root / f"mg-tied{tied}", tp=tp, pp=pp, progress=False)
        out[f"mg-tied{tied}"] = root / f"mg-tied{tied}"
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_hf_checkpoint_logits_equal_original_on_kept_ids(toks, ckpts, tmp_path, tied):
    from transformers import LlamaForCausalLM

    hf = ckpts[f"hf-tied{tied}"]
    res = prune_vocab(ckpts["counts"], 300, hf / "tokenizer.model", tmp_path / "out", hf_dir=hf, progress=False)
    vmap = res.vmap
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert PAD in vmap.kept and cfg["pad_token_id"] == gen["pad_token_id"] == vmap.map_ids([PAD])[0] != PAD
    assert cfg["vocab_size"] == vmap.new_size and cfg["bos_token_id"] == vmap.map_ids([1])[0]
    text, _ = kept_only_text(load_tokenizer(toks["spm-bpe"]), set(vmap.kept), byte_level=False)
    old_ids = torch.tensor([load_tokenizer(toks["spm-bpe"]).encode(text)[:64]]).view(2, 32)
    with torch.no_grad():
        ref = LlamaForCausalLM.from_pretrained(hf).eval()(old_ids).logits[..., vmap.index()]
        got = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()(
            torch.tensor(vmap.map_ids(old_ids.flatten().tolist())).view(2, 32)).logits
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tied", [False, True])  # untied at TP=2, tied at PP=2 (the last stage's output copy)
def test_megatron_prune_equals_hf_prune(ckpts, tmp_path, tied):
    import sentencepiece
    from safetensors.torch import load_file

    from megatron_prune.checkpoint import megatron_io as mio
    from megatron_prune.checkpoint.convert_files import megatron_to_hf

    hf, mg = ckpts[f"hf-tied{tied}"], ckpts[f"mg-tied{tied}"]
    res = prune_vocab(ckpts["counts"], 400, mg / "tokenizer.model", tmp_path / "mg", load=mg, progress=False)
    prune_vocab(ckpts["counts"], 400, hf / "tokenizer.model", tmp_path / "hf", hf_dir=hf, progress=False)
    meta = mio.read_meta(tmp_path / "mg")
    assert meta.shape.vocab_size == res.vmap.new_size == 400 and PAD in res.vmap.kept
    assert meta.hf_config["pad_token_id"] == res.vmap.map_ids([PAD])[0]
    assert meta.padded_vocab_size == meta.shape.padded_vocab(128, meta.tp)
    assert meta.history[-1]["op"] == "prune-vocab" and meta.history[-1]["keep"] == 400
    rows = meta.padded_vocab_size // meta.tp
    for pp_rank in range(meta.pp):
        for tp_rank in range(meta.tp):
            state = mio.load_rank(tmp_path / "mg", tp_rank, pp_rank, meta)
            assert state["args"].padded_vocab_size == meta.padded_vocab_size
            vocab_keys = [k for k in ("embedding.word_embeddings.weight", "output_layer.weight") if k in state["model"]]
            assert len(vocab_keys) == (pp_rank == 0) + (pp_rank == meta.pp - 1 and (not tied or meta.pp > 1))
            assert all(state["model"][k].shape == (rows, 64) for k in vocab_keys)
    assert {"tokenizer.model", VOCAB_MAP} <= {f.name for f in (tmp_path / "mg").iterdir()}
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", progress=False)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "back" / "tokenizer.model"))
    exported = json.loads((tmp_path / "back" / "config.json").read_text())["vocab_size"]
    assert exported == sp.get_piece_size() == 400 < meta.padded_vocab_size  # the tokenizer's size, not the padded
    back, want = load_file(tmp_path / "back" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert set(back) == set(want) - {"lm_head.weight"} if tied else set(back) == set(want)
    for key in back:
        assert torch.equal(back[key], want[key]), key


# ----------------------------------------------------------------------------- CLI and bad input
def test_cli_counts_prune_and_bad_input(toks, ckpts, tmp_path, capsys):
    mg, counts = ckpts["mg-tiedFalse"], tmp_path / "counts.json"
    tok = str(toks["spm-bpe"])
    assert main(["vocab-freq", "--tokenizer", tok, "--input", str(SAMPLES / "heldout.jsonl"), "--output",
                 str(counts), "--workers", "1", "--no-progress"]) == 0
    other = make_counts(toks["hf-bytelevel"], tmp_path / "other.json")
    bad = {"another tokenizer": ["--counts", str(other), "--keep", "300", "--tokenizer", tok],
           "larger than the 1000 ids": ["--counts", str(counts), "--keep", "1001", "--tokenizer", tok],
           "is below the minimum vocabulary": ["--counts", str(counts), "--keep", "259", "--tokenizer", tok],
           "between 1 and the": ["--counts", str(counts), "--keep-min", "1000", "--tokenizer", tok],
           "smaller than the tokenizer": ["--counts", str(make_counts(REAL_SPM, tmp_path / "real.json")), "--keep",
                                          "300", "--tokenizer", str(REAL_SPM)]}
    capsys.readouterr()
    errors = {}
    for needle, argv in bad.items():
        assert main(["prune-vocab", *argv, "--load", str(mg), "--save", str(tmp_path / "out"), "--no-progress"]) == 2
        err = errors[needle] = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    minimum = int(re.search(r"use --keep (\d+) or more", errors["is below the minimum vocabulary"]).group(1))
    for flag, n, out in [("--keep", minimum, "min"), ("--keep", 300, "300"), ("--keep-min", 300, "min300")]:
        assert main(["prune-vocab", "--counts", str(counts), flag, str(n), "--tokenizer", tok, "--load", str(mg),
                     "--save", str(tmp_path / out), "--no-progress"]) == 0
        size = vocab_map(tmp_path / out).new_size
        assert f"vocabulary 1000 -> {size} ids" in capsys.readouterr().out
        assert size > n if flag == "--keep-min" else size == n  # the minimum named is reachable


# ----------------------------------------------------------------------------- --keep is the final size
def _reference_roundtrip(kind: str, path: Path):
    """decode(encode(text)) by the tokenizer libraries themselves (not this project's wrappers)."""
    if kind.startswith("spm"):
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        return sp.get_piece_size(), lambda t: sp.decode(sp.encode(t))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return tok.get_vocab_size(with_added_tokens=True), lambda t: tok.decode(tok.encode(t).ids)


@pytest.mark.parametrize("kind", ["spm-bpe", "hf-bytelevel", "llama2-dir"])
def test_keep_is_the_final_vocabulary_size_and_text_round_trips(toks, tmp_path, kind):
    """--keep 400 of 1000 BPE tokens: exactly 400 in total (specials, bytes and merge intermediates inside the
    budget), and every sample document decodes back as the original tokenizer decodes it."""
    tok = toks[kind]
    res = prune_vocab(make_counts(tok, tmp_path / "c.json"), 400, tok, tmp_path / "out", progress=False)
    files = {"spm-bpe": ("tokenizer.model", tok), "hf-bytelevel": ("tokenizer.json", tok / "tokenizer.json"),
             "llama2-dir": ("tokenizer.json", tok / "tokenizer.json")}[kind]
    old_size, old_rt = _reference_roundtrip(kind, files[1])
    new_size, new_rt = _reference_roundtrip(kind, tmp_path / "out" / files[0])
    assert old_size == 1000 and new_size == res.vmap.new_size == 400
    assert res.stats["merge_closure_added"] > 0  # the budget really had to hold intermediates
    for name in ("train.jsonl", "heldout.jsonl"):
        for t in texts(name):
            assert new_rt(t) == old_rt(t)


@pytest.mark.parametrize("kind", ["spm-bpe", "llama2-json"])
def test_minimum_budget_is_the_specials_bytes_and_space(toks, tmp_path, kind):
    """The smallest --keep for a byte-fallback BPE model, counted with sentencepiece: control, unknown and byte
    pieces plus "▁" (without it, a dropped space decodes as a literal "▁", in sentencepiece and in the LLaMA-2
    tokenizer.json decoder alike). One less is refused; at the minimum, text still round-trips."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(toks["spm-bpe"]))
    minimum = sum(1 for i in range(sp.get_piece_size())
                  if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.id_to_piece(i) == "\u2581")
    tok, out_name = {"spm-bpe": (toks["spm-bpe"], "tokenizer.model"),
                     "llama2-json": (toks["llama2-dir"] / "tokenizer.json", "tokenizer.json")}[kind]
    counts = make_counts(tok, tmp_path / "c.json")
    with pytest.raises(UserError, match=f"use --keep {minimum} or more"):
        prune_vocab(counts, minimum - 1, tok, tmp_path / "too-small", progress=False)
    res = prune_vocab(counts, minimum, tok, tmp_path / "out", progress=False)
    _, old_rt = _reference_roundtrip(kind, tok)
    new_size, new_rt = _reference_roundtrip(kind, tmp_path / "out" / out_name)
    assert res.vmap.new_size == new_size == minimum == 260
    for t in texts("heldout.jsonl")[:5] + [DROPPED_TEXT, "a b  c"]:  # everything is bytes now, and still lossless
        assert new_rt(t) == old_rt(t)


def test_budget_skips_a_token_whose_intermediates_do_not_fit():
    """Toy BPE model: "abc" is the most frequent but needs "ab" too; with one free slot it is skipped and the next
    token that fits alone is kept instead. --keep-min keeps "abc" and adds "ab" on top."""
    model = _toy_spm([("ab", -1.0), ("abc", -2.0), ("a", -3.0), ("b", -4.0), ("c", -5.0), ("bc", -6.0)])
    source = TokenizerSource("toy.model", spm_model=model)
    fingerprint = source.fingerprint()
    counts = TokenCounts((0, 0, 0, 0, 100, 50, 40, 30, 0), fingerprint)  # ids 3.. = ab, abc, a, b, c, bc
    vmap, stats = plan_vocab(source, counts, 4)
    assert vmap.kept == (0, 1, 2, 5) and stats["skipped_no_room"] == 1  # <unk> <s> </s> + "a"
    assert _encode(spm.prune_model(model, vmap.kept), "abc") == ["a", "bc"]  # "bc": one <unk> for both
    vmap, stats = plan_vocab(source, counts, 5)
    assert vmap.kept == (0, 1, 2, 3, 4) and stats["merge_closure_added"] == 1 and stats["by_frequency"] == 1
    assert _encode(spm.prune_model(model, vmap.kept), "abc") == ["abc"]
    vmap, stats = plan_vocab(source, counts, 2, keep_min=True)
    assert vmap.kept == (0, 1, 2, 3, 4, 5) and stats["merge_closure_added"] == 1


# ----------------------------------------------------------------------------- untrusted counts files (issue 26)
@pytest.mark.parametrize("field,value,needle", [
    ("counts", "x", "'counts' must be a list of non-negative integers (found 'x')"),
    ("counts", 1.5, "(found 1.5)"),
    ("counts", True, "(found True)"),
    ("counts", 1e400, "(found inf)"),
    ("counts", -3, "(found -3)"),
    ("counts", None, "(found None)"),
    ("tokenizer", "abc", "'tokenizer' must record"),
    ("documents", "many", "'documents' a non-negative integer"),
])
def test_malformed_counts_are_one_line(toks, tmp_path, capsys, field, value, needle):
    """A counts file edited by hand or by another tool: one line naming it and the field (before: 28-31-line
    tracebacks for text or infinite counts, and 1.5 / true silently read as 1)."""
    tok = str(toks["spm-bpe"])
    good = json.loads(make_counts(toks["spm-bpe"], tmp_path / "c.json").read_text())
    if field == "counts":
        good["counts"][3] = value
    else:
        good[field] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(good).replace("Infinity", "1e400"))
    capsys.readouterr()
    assert main(["prune-vocab", "--counts", str(bad), "--keep", "300", "--tokenizer", tok, "--save",
                 str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: ") and needle in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_vocab_freq_into_a_missing_folder_fails_before_counting(toks, tmp_path, capsys, monkeypatch):
    """Checked first: the corpus is not counted (before: it was, then the write of its own temporary file failed
    with `No such file or directory`)."""
    import megatron_prune.vocab.counts as vc

    monkeypatch.setattr(vc, "count_tokens", lambda *a, **k: pytest.fail("counted before checking the output"))
    out = tmp_path / "missing" / "sub" / "counts.json"
    rc = main(["vocab-freq", "--tokenizer", str(toks["spm-bpe"]), "--input", str(SAMPLES / "heldout.jsonl"),
               "--output", str(out), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"error: --output {out}: ") and "no such folder" in err and "\n" not in err, err
    assert not (tmp_path / "missing").exists()
