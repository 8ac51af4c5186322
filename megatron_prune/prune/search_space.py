"""The budget search space: pruned shapes of a source model whose parameter count is within 95-100% of a budget.
Pure: no I/O, no processes. Which candidate recovers best (scoring) is not decided here.

Axes: num_layers, hidden_size, heads per query group and ffn_hidden_size. A GQA model keeps its query groups and
loses heads inside them; an MHA model stays MHA (heads = groups), as a hand-given `--num-attention-heads-remain`
does (select.PruneTarget). Every candidate is
- reachable at the checkpoint's TP in balance mode: it passes PruneTarget.resolve and LlamaShape.check_parallel,
  the same validation as hand-given sizes;
- loadable by HF transformers: hidden % heads == 0 (apply_hf.hf_config_warning; transformers >= 5 requires it);
- made of widths (hidden, FFN) that are multiples of `width_multiple`, or the source's own width;
- within the limits: at most `max_depth_drop` of the layers and `max_width_drop` of each width (hidden, heads
  per group or MHA heads, FFN) removed.

The parameter count is config.shape.count_params, LlamaShape's own formula. It is linear in the FFN width, so for
each (layers, hidden, heads) the FFN widths that land in the budget window come from one division instead of
a scan, and only the best `candidates` are kept (a heap): a 7B-sized space stays fast even at multiple 8.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from megatron_prune.config.shape import PARAM_FIELDS, LlamaShape, ShapeError, count_params
from megatron_prune.errors import UserError
from megatron_prune.prune.apply_hf import hf_config_warning
from megatron_prune.prune.plan import PlanError
from megatron_prune.prune.select import PruneTarget

# Default width multiple. llmcompressor's group-quantized W4A16 / W8A16 schemes (group size 128) need every
# quantized linear's input columns % 128 == 0: hidden (q/k/v/gate/up) and FFN (down); tensor-core GEMM tiles
# also want multiples of 64/128. Models with hidden < ~1024 (tests, toys) need a smaller --width-multiple.
DEFAULT_WIDTH_MULTIPLE = 128
WINDOW = 0.95  # candidates keep between WINDOW * budget and budget parameters


class BudgetError(UserError, ValueError):
    """A parameter budget that cannot be parsed or met (a ValueError too, like the other domain errors)."""


@dataclass(frozen=True)
class SearchLimits:
    width_multiple: int = DEFAULT_WIDTH_MULTIPLE
    max_depth_drop: float = 0.5   # fraction of the layers that may be dropped
    max_width_drop: float = 0.5   # fraction of each width (hidden, heads, FFN) that may be removed
    candidates: int = 8           # how many of the closest shapes to keep

    def __post_init__(self) -> None:
        if not isinstance(self.width_multiple, int) or self.width_multiple < 1:
            raise BudgetError(f"--width-multiple must be a positive integer, got {self.width_multiple!r}")
        for name in ("max_depth_drop", "max_width_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise BudgetError(f"--{name.replace('_', '-')} must be a fraction in [0, 1), got {getattr(self, name)}")
        if self.candidates < 1:
            raise BudgetError(f"--search-candidates must be >= 1, got {self.candidates}")


@dataclass(frozen=True)
class Candidate:
    shape: LlamaShape
    params: int
    budget: int

    @property
    def fraction(self) -> float:
        return self.params / self.budget

    def line(self) -> str:
        s = self.shape
        return (f"layers={s.num_layers} hidden={s.hidden_size} heads={s.num_attention_heads}/{s.num_query_groups} "
                f"ffn={s.ffn_hidden_size}")


def parse_budget(text: str | int, source_params: int) -> int:
    """'64047840', '6.4e7' (absolute) or '50%' (of the source's parameters) -> a parameter count."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) * source_params / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise BudgetError(f"--target-params {raw!r}: expected a parameter count (64047840, 6.4e7) or a "
                          f"percentage of the source's {source_params:,} (50%)") from None
    if not math.isfinite(value) or round(value) < 1:
        raise BudgetError(f"--target-params {raw!r} is not a positive parameter count")
    budget = round(value)
    if budget > source_params:
        raise BudgetError(f"--target-params {raw} = {budget:,} exceeds the source model's {source_params:,} "
                          f"parameters: pruning only removes")
    return budget


# ----------------------------------------------------------------------------- axes
def _kept_range(n: int, drop: float) -> range:
    """n' in [n - floor(n * drop), n]: at most `drop` of n removed, at least 1 kept."""
    return range(max(1, n - math.floor(n * drop)), n + 1)


def _widths(n: int, multiple: int, drop: float, divisor: int = 1) -> list[int]:
    """Multiples of `multiple` (and `divisor`) that keep at least (1 - drop) of n, plus n itself, ascending."""
    out = {v for v in _kept_range(n, drop) if v % multiple == 0 and v % divisor == 0}
    return sorted(out | {n})


def _attention(src: LlamaShape, tp: int, drop: float) -> list[tuple[int, int]]:
    """(heads, groups) options. GQA keeps its groups; MHA stays MHA and needs groups % TP == 0 (balance mode)."""
    g0 = src.num_query_groups
    if g0 == src.num_attention_heads:
        return [(h, h) for h in _kept_range(g0, drop) if h % tp == 0]
    return [(g0 * k, g0) for k in _kept_range(src.heads_per_group, drop)]


def _hf_loadable(src: LlamaShape, hidden: int, heads: int, groups: int) -> bool:
    return hf_config_warning(src.replace(hidden_size=hidden, num_attention_heads=heads,
                                         num_query_groups=groups)) is None


# ----------------------------------------------------------------------------- enumeration
Key = tuple[int, int, int, int, int]  # (layers, hidden, heads, groups, ffn)


def _params(src: LlamaShape, key: Key) -> int:
    layers, hidden, heads, groups, ffn = key
    fields = {f: getattr(src, f) for f in PARAM_FIELDS}
    fields.update(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                  ffn_hidden_size=ffn)
    return count_params(**fields)


class _Best:
    """The k best (params, key) by closeness to the budget from below; ties: deeper, then wider first."""

    def __init__(self, budget: int, k: int):
        self.budget, self.k, self.heap = budget, k, []  # heap of negated sort keys: heap[0] is the worst kept

    def add(self, params: int, key: Key) -> None:
        item = (params - self.budget, *key)  # = the sort key (budget - params, -layers, ...) negated
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, item)
        elif item > self.heap[0]:
            heapq.heapreplace(self.heap, item)

    def sorted(self) -> list[tuple[int, Key]]:
        return [(self.budget + d, tuple(key)) for d, *key in sorted(self.heap, reverse=True)]


def _enumerate(src: LlamaShape, tp: int, budget: int, limits: SearchLimits
               ) -> tuple[list[tuple[int, Key]], tuple[int, Key] | None]:
    """(params, key) of the best grid shapes inside the window, and the grid shape closest to the budget overall.

    count_params is a + layers * (b + ffn * c) for fixed (hidden, heads): three calls per pair give a, b, c, and
    the FFN widths inside the window for each depth follow from one division."""
    lo = -(-budget * round(WINDOW * 100) // 100)  # ceil(0.95 * budget), in integers
    ffns = _widths(src.ffn_hidden_size, limits.width_multiple, limits.max_width_drop, divisor=tp)
    best, closest = _Best(budget, limits.candidates), None
    for hidden in _widths(src.hidden_size, limits.width_multiple, limits.max_width_drop):
        for heads, groups in _attention(src, tp, limits.max_width_drop):
            if not _hf_loadable(src, hidden, heads, groups):
                continue
            fixed = _params(src, (0, hidden, heads, groups, 0))                  # embeddings, final norm
            per_layer = _params(src, (1, hidden, heads, groups, 0)) - fixed       # a layer without FFN
            per_ffn = _params(src, (1, hidden, heads, groups, 1)) - fixed - per_layer  # one FFN channel
            for layers in _kept_range(src.num_layers, limits.max_depth_drop):
                base, slope = fixed + layers * per_layer, layers * per_ffn
                f_lo, f_hi = -((base - lo) // slope), (budget - base) // slope  # ceil / floor
                i0, i1 = bisect_left(ffns, f_lo), bisect_right(ffns, f_hi)
                for f in ffns[max(i0, i1 - limits.candidates):i1]:  # the largest fit best
                    best.add(base + slope * f, (layers, hidden, heads, groups, f))
                for f in ffns[max(i1 - 1, 0):i1 + 1]:  # the neighbours of the budget line
                    p = base + slope * f
                    if closest is None or abs(p - budget) < abs(closest[0] - budget):
                        closest = (p, (layers, hidden, heads, groups, f))
    return best.sorted(), closest


def validate(src: LlamaShape, tp: int, key: Key) -> LlamaShape:
    """The shape of `key` through the same checks as hand-given sizes; raises PlanError / ShapeError otherwise."""
    layers, hidden, heads, groups, ffn = key
    target = PruneTarget(hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                         ffn_hidden_size=ffn, num_layers=layers, mode="balance").resolve(src, tp)
    target.check_parallel(tp)
    warning = hf_config_warning(target)
    if warning:
        raise PlanError(warning)
    return target


def _candidate(src: LlamaShape, tp: int, budget: int, key: Key) -> Candidate:
    """The grid is built to pass validation; a shape that does not is a bug here, not a user error."""
    try:
        shape = validate(src, tp, key)
    except (PlanError, ShapeError) as e:
        raise RuntimeError(f"the search space produced an invalid shape {key}: {e}") from e
    return Candidate(shape=shape, params=shape.num_params(), budget=budget)


def search(src: LlamaShape, tp: int, budget: int, limits: SearchLimits = SearchLimits()) -> list[Candidate]:
    """The `limits.candidates` valid shapes closest to `budget` from below, within 95-100% of it (ties: deeper,
    then wider first). Raises BudgetError naming the closest shape when none fits."""
    inside, closest = _enumerate(src, tp, budget, limits)
    if inside:
        return [_candidate(src, tp, budget, key) for _, key in inside]
    near = _candidate(src, tp, budget, closest[1]) if closest else None
    hint = (f"closest: {near.line()} with {near.params:,} params ({100 * near.fraction:.2f}% of the budget)"
            if near else "no shape passes the limits at all")
    raise BudgetError(f"no shape within {100 * WINDOW:.0f}-100% of {budget:,} params at TP {tp} (width multiple "
                      f"{limits.width_multiple}, at most {limits.max_depth_drop:g} of layers and "
                      f"{limits.max_width_drop:g} of widths dropped); {hint}; loosen --width-multiple, "
                      f"--max-width-drop or --max-depth-drop, or change --target-params")


def format_table(cands: list[Candidate]) -> str:
    rows = [("rank", "shape", "params", "% of budget")]
    rows += [(str(i), c.line(), f"{c.params:,}", f"{100 * c.fraction:.2f}%") for i, c in enumerate(cands, 1)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(v.rjust(w) if i != 1 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)
