"""SentencePiece model surgery, pure functions over `sentencepiece_model_pb2.ModelProto` (no file I/O).

Pruning removes pieces from `ModelProto.pieces`; scores are left as they are, so the surviving pieces keep their
relative priorities. Always kept: CONTROL (<s>, </s>), UNKNOWN (<unk>), USER_DEFINED and BYTE pieces (sentencepiece
refuses a byte_fallback model without all 256 byte pieces, and they are what dropped text falls back to), and the
whitespace piece "▁" (see `always_keep`).

BPE models have no merge table: two adjacent symbols merge when their concatenation is a piece, highest score first
(leftmost on ties). A kept piece may only be reachable through a piece that would be dropped ("▁the" <- "▁th" +
"e"); `merge_closure` adds those intermediates, so that any text whose original segmentation used only kept pieces
is segmented identically after pruning (every merge it needed is still there, and no merge is new).
Unigram models need no closure (Viterbi over a subset of the pieces keeps an optimal path that only used kept
pieces), but the unknown-piece penalty follows the lowest remaining score, so rare ties could differ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Sequence
from megatron_prune.errors import UserError


if TYPE_CHECKING:
    from sentencepiece.sentencepiece_model_pb2 import ModelProto

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
ALWAYS_KEPT_TYPES = (UNKNOWN, CONTROL, USER_DEFINED, BYTE)
UNIGRAM, BPE = 1, 2
SPACE = "\u2581"  # "▁", sentencepiece's whitespace symbol


class SpmError(UserError, ValueError):
    """A SentencePiece model that cannot be read or pruned."""


def model_proto_class():
    try:
        from sentencepiece import sentencepiece_model_pb2
    except Exception as e:  # ImportError without protobuf; protobuf's VersionError when it is too old
        raise SpmError(f"reading a SentencePiece model needs a protobuf package that matches sentencepiece "
                       f"(pip install -U protobuf): {type(e).__name__}: {e}") from None
    return sentencepiece_model_pb2.ModelProto


def parse_model(data: bytes, name: str = "model") -> "ModelProto":
    model = model_proto_class()()
    try:
        model.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError, or garbage that parses into nonsense below
        raise SpmError(f"{name}: not a SentencePiece model ({type(e).__name__}: {e})") from None
    if not model.pieces:
        raise SpmError(f"{name}: not a SentencePiece model (no pieces)")
    return model


def pieces(model: "ModelProto") -> list[str]:
    """Piece strings in id order."""
    return [p.piece for p in model.pieces]


def always_keep(model: "ModelProto") -> set[int]:
    """Specials, bytes and the lone whitespace piece: sentencepiece turns "▁" into a space before byte fallback
    is decoded, so a "▁" that fell back to bytes would decode as a literal "▁" instead of a space."""
    return {i for i, p in enumerate(model.pieces) if p.type in ALWAYS_KEPT_TYPES or p.piece == SPACE}


def _bpe_derivation(piece: str, scores: dict[str, float]) -> list[str] | None:
    """Pieces formed while sentencepiece's BPE encodes `piece` on its own (the same merges, in the same order,
    as inside any text where `piece` is an output symbol), or None when the piece is not reachable."""
    symbols = list(piece)
    formed: list[str] = []
    while len(symbols) > 1:
        best, best_score = -1, 0.0
        for i in range(len(symbols) - 1):
            score = scores.get(symbols[i] + symbols[i + 1])
            if score is not None and (best < 0 or score > best_score):  # strict: leftmost wins ties
                best, best_score = i, score
        if best < 0:
            return None
        symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
        formed.append(symbols[best])
    return formed if symbols == [piece] else None


def derivations(model: "ModelProto") -> Callable[[int], list[int]]:
    """id -> ids of the pieces formed while building that piece (BPE NORMAL pieces; nothing otherwise). The
    tables are built once, so asking for every id of a large vocabulary stays linear."""
    if model.trainer_spec.model_type != BPE:
        return lambda i: []
    # Pieces that take part in BPE merges: sentencepiece's `pieces_` map (NORMAL, USER_DEFINED, UNUSED).
    mergeable = {p.piece: p.score for p in model.pieces if p.type in (NORMAL, USER_DEFINED, UNUSED)}
    index = {p.piece: i for i, p in enumerate(model.pieces)}

    def formed(i: int) -> list[int]:
        if model.pieces[i].type != NORMAL:
            return []
        return [index[p] for p in _bpe_derivation(model.pieces[i].piece, mergeable) or ()]

    return formed


def merge_closure(model: "ModelProto", ids: Iterable[int]) -> set[int]:
    """`ids` plus, for a BPE model, every piece the kept pieces are built through (see the module doc)."""
    return closure(ids, derivations(model))


def closure(ids: Iterable[int], direct: Callable[[int], Iterable[int]]) -> set[int]:
    """The smallest superset of `ids` that holds `direct(i)` for each of its members."""
    kept = set(ids)
    todo = list(kept)
    while todo:
        for j in direct(todo.pop()):
            if j not in kept:
                kept.add(j)
                todo.append(j)
    return kept


def prune_model(model: "ModelProto", kept: Sequence[int]) -> "ModelProto":
    """A copy of `model` with only the pieces `kept` (old ids, ascending: new id = position)."""
    out = model_proto_class()()
    for name in ("trainer_spec", "normalizer_spec", "denormalizer_spec"):
        if model.HasField(name):
            getattr(out, name).CopyFrom(getattr(model, name))
    # Top-level fields not copied: `self_test_data` (field 4, unknown to some generated protos), whose expected
    # segmentations may use dropped pieces; sentencepiece's Load() runs that self-test and would fail.
    out.pieces.extend(model.pieces[i] for i in kept)
    old_to_new = {old: new for new, old in enumerate(kept)}
    spec = out.trainer_spec
    spec.vocab_size = len(kept)
    for field in ("unk_id", "bos_id", "eos_id", "pad_id"):  # training-time ids; encoding looks pieces up by name
        old = getattr(spec, field)
        setattr(spec, field, old_to_new.get(old, -1) if old >= 0 else old)
    return out


def check_loadable(model: "ModelProto") -> None:
    """Raise SpmError unless sentencepiece itself accepts the model."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model.SerializeToString())
    except (RuntimeError, OSError) as e:
        raise SpmError(f"the pruned SentencePiece model does not load: {e}") from None
