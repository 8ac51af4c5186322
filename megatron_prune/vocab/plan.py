"""Which ids a pruned vocabulary keeps (pure).

`--keep N` is the size of the final vocabulary, because that is what a user sizes (the embedding, e.g. a multiple
of 128 x TP). The mandatory tokens come first: special, unknown and added tokens, the byte-fallback / byte-level
alphabet, ids the configs name, and whatever those are merged through. The rest of the budget is filled in
frequency order; a token costs itself plus the intermediates it is merged through that are not kept yet, and a
token whose cost does not fit in what is left is skipped for the next one (a cheaper, rarer token may still fit).

`--keep-min N` is the older rule: the N most frequent tokens, with the mandatory tokens and the merge closure
added on top (the final size is only known afterwards).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from megatron_prune.errors import InputError, UserError
from megatron_prune.vocab.counts import CountsError, TokenCounts, top_ids
from megatron_prune.vocab.slice import VocabMap
from megatron_prune.vocab.tokenizer_files import TokenizerSource


class VocabBudgetError(CountsError, UserError):
    """A --keep budget the tokenizer cannot be pruned to; the message names the limit."""


def plan_vocab(source: TokenizerSource, counts: TokenCounts, keep: int, extra_keep: Iterable[int] = (),
               keep_min: bool = False) -> tuple[VocabMap, dict[str, Any]]:
    """Kept ids and the stats that describe them. `keep` is the final size, or with `keep_min` the number of
    most frequent tokens kept on top of the mandatory ones and the merge closure."""
    size = len(counts.counts)
    extra = set(extra_keep)
    bad = sorted(i for i in extra if not 0 <= i < size)
    if bad:
        raise InputError(f"the checkpoint's configs name token ids {bad[:5]} outside the tokenizer's {size} ids")
    always = source.always_keep() | extra
    if keep_min:
        top = top_ids(counts.counts, keep, always)
        kept, by_frequency, skipped = source.closure(always | set(top)), set(top), 0
    else:
        mandatory = source.closure(always)
        check_budget(keep, len(mandatory), size, source.path)
        order = sorted(range(size), key=lambda i: (-counts.counts[i], i))  # ties: lower id (SentencePiece score)
        kept, by_frequency, skipped = fill_budget(order, keep, mandatory, source.needs)
    vmap = VocabMap(size, tuple(sorted(kept)))
    total = counts.total
    stats = {"keep": keep, "keep_mode": "min" if keep_min else "budget", "old_vocab_size": size,
             "vocab_size": vmap.new_size, "always_kept": len(always), "by_frequency": len(by_frequency - always),
             "merge_closure_added": len(kept - always - by_frequency), "skipped_no_room": skipped,
             "kept_never_counted": sum(1 for i in by_frequency - always if counts.counts[i] == 0),
             "coverage": sum(counts.counts[i] for i in kept) / total if total else None}
    return vmap, stats


def check_budget(keep: int, minimum: int, size: int, tokenizer: str) -> None:
    if keep < minimum:
        raise VocabBudgetError(
            f"--keep {keep} is below the minimum vocabulary of {tokenizer}: {minimum} tokens are always kept "
            f"(special, unknown, added, byte-fallback / byte-level and config-named tokens and the pieces they are "
            f"merged through); use --keep {minimum} or more")
    if keep > size:
        raise VocabBudgetError(f"--keep {keep} is larger than the {size} ids of {tokenizer}")


def fill_budget(order: Sequence[int], budget: int, base: Iterable[int], needs: Callable[[int], set[int]]
                ) -> tuple[set[int], set[int], int]:
    """Greedy fill: (kept ids, ids added for their own frequency, candidates skipped because their cost did not
    fit). `needs(i)` is `i` plus everything keeping it requires."""
    kept, chosen, skipped = set(base), set(), 0
    for i in order:
        if len(kept) >= budget:
            break
        if i in kept:
            continue
        new = needs(i) - kept
        if len(kept) + len(new) > budget:
            skipped += 1
            continue
        kept |= new
        chosen.add(i)
    return kept, chosen, skipped
