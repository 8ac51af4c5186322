"""The budget search space: pruned shapes of a source model that meet a budget (Budget): a parameter count
(95-100% of it), an inference memory size in bytes (95-100% of it), or both (95-100% of the parameters and at most
the memory). Pure: no I/O, no processes. Which candidate recovers best (scoring) is not decided here.

Axes: num_layers, hidden_size, heads per query group and ffn_hidden_size. A GQA model keeps its query groups and
loses heads inside them; an MHA model stays MHA (heads = groups), as a hand-given `--num-attention-heads-remain`
does (select.PruneTarget). Every candidate is
- reachable at the checkpoint's TP in balance mode: it passes PruneTarget.resolve and LlamaShape.check_parallel,
  the same validation as hand-given sizes;
- loadable by HF transformers: hidden % heads == 0 (config.shape.hf_config_warning; transformers >= 5 requires it);
- made of widths (hidden, FFN) that are multiples of `width_multiple`, or the source's own width;
- within the limits: at most `max_depth_drop` of the layers and `max_width_drop` of each width (hidden, heads
  per group or MHA heads, FFN) removed.

The parameter count is config.shape.count_params, LlamaShape's own formula; memory is
config.shape.inference_memory_bytes (weights + KV cache). Both are linear in the FFN width for fixed (layers,
hidden, heads), so for each (layers, hidden, heads) the FFN widths that land in the budget windows come from one
division per bound instead of a scan, and only the best `candidates` are kept (a heap): a 7B-sized space stays
fast even at multiple 8.

The budget itself (parsing the flags) is prune.budget's; the tables and the width warning for hand-given sizes
are prune.display's.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from types import SimpleNamespace

from megatron_prune.config.shape import PARAM_FIELDS, GiB, LlamaShape, ShapeError, count_params, hf_config_warning
from megatron_prune.prune.budget import Budget, BudgetError
from megatron_prune.prune.plan import PlanError
from megatron_prune.prune.select import PruneTarget

# Default width multiple. llmcompressor's group-quantized W4A16 / W8A16 schemes (group size 128) need every
# quantized linear's input columns % 128 == 0: hidden (q/k/v/gate/up) and FFN (down); tensor-core GEMM tiles
# also want multiples of 64/128. Models with hidden < ~1024 (tests, toys) need a smaller --width-multiple.
DEFAULT_WIDTH_MULTIPLE = 128
WINDOW = 0.95  # candidates keep between WINDOW * budget and budget parameters (or bytes)


# Default drop limits (0.5), measured on SmolLM2-135M at the demo's budget (47% of the parameters, TP 3, activation
# importance, loss on held-apart windows): with 0.7 instead, the 12 closest shapes include 7 that remove more than
# half of a width or of the layers; every one of them lost to the 0.5-limit pick (loss 8.2-13.5 vs 5.88; 3 of 9
# heads per model: 10.5-11.6), which stayed the winner. Beyond half, candidates mostly crowd out useful ones.
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
    budget: Budget       # an int is read as Budget(params=int)
    memory: int | None = None  # bytes, when the budget has a memory part

    def __post_init__(self) -> None:
        if isinstance(self.budget, int):
            object.__setattr__(self, "budget", Budget(params=self.budget))

    @property
    def fraction(self) -> float:
        """Of the budget that ranks: the parameters, or the memory when only memory is given."""
        return self.params / self.budget.params if self.budget.params else self.memory / self.budget.memory

    def line(self) -> str:
        s = self.shape
        return (f"layers={s.num_layers} hidden={s.hidden_size} heads={s.num_attention_heads}/{s.num_query_groups} "
                f"ffn={s.ffn_hidden_size}")


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


def _fields(src: LlamaShape, key: Key) -> SimpleNamespace:
    """The PARAM_FIELDS of `key` on top of the source's, without LlamaShape's validation (called per grid point)."""
    layers, hidden, heads, groups, ffn = key
    fields = {f: getattr(src, f) for f in PARAM_FIELDS}
    fields.update(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                  ffn_hidden_size=ffn)
    return SimpleNamespace(**fields)


def _params(src: LlamaShape, key: Key) -> int:
    return count_params(**vars(_fields(src, key)))


class _Line:
    """value(layers, ffn) = fixed + layers * (per_layer + ffn * per_ffn) for fixed (hidden, heads): parameters and
    memory both have this form, so three evaluations of the one formula give the coefficients."""

    def __init__(self, value, hidden: int, heads: int, groups: int):
        self.fixed = value((0, hidden, heads, groups, 0))                                 # embeddings, final norm
        self.per_layer = value((1, hidden, heads, groups, 0)) - self.fixed                # a layer without FFN
        self.per_ffn = value((1, hidden, heads, groups, 1)) - self.fixed - self.per_layer  # one FFN channel

    def at(self, layers: int) -> tuple[int, int]:
        """(base, slope): value = base + slope * ffn at this depth."""
        return self.fixed + layers * self.per_layer, layers * self.per_ffn


class _Best:
    """The k best (value, key) by closeness to the target from below; ties: deeper, then wider first."""

    def __init__(self, target: int, k: int):
        self.target, self.k, self.heap = target, k, []  # heap of negated sort keys: heap[0] is the worst kept

    def add(self, value: int, key: Key) -> None:
        item = (value - self.target, *key)  # = the sort key (target - value, -layers, ...) negated
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, item)
        elif item > self.heap[0]:
            heapq.heapreplace(self.heap, item)

    def keys(self) -> list[Key]:
        return [tuple(key) for _, *key in sorted(self.heap, reverse=True)]


def _window(lo: int | None, hi: int | None, base: int, slope: int) -> tuple[float, float]:
    """FFN widths f (reals, rounded inward) with lo <= base + slope * f <= hi; a None bound is open."""
    f_lo = -((base - lo) // slope) if lo is not None else -math.inf  # ceil
    f_hi = (hi - base) // slope if hi is not None else math.inf       # floor
    return f_lo, f_hi


class _Closest:
    """The grid shape nearest the budget when none meets it: the sum of relative distances to the parameter
    target, to the memory target (memory alone) or above the memory ceiling (with parameters). Convex in the FFN
    width, so only the grid neighbours of the points where each term bends need to be looked at."""

    def __init__(self, budget: Budget):
        self.budget, self.best = budget, None  # (distance, key)

    def distance(self, p: int, m: int) -> float:
        b, d = self.budget, 0.0
        if b.params is not None:
            d += abs(p - b.params) / b.params
        if b.memory is not None:
            d += (abs(m - b.memory) if b.params is None else max(0, m - b.memory)) / b.memory
        return d

    def add(self, ffns: list[int], key: Key, pline: tuple[int, int], mline: tuple[int, int] | None) -> None:
        bends = [(self.budget.params - pline[0]) / pline[1]] if self.budget.params is not None else []
        if mline is not None:
            bends.append((self.budget.memory - mline[0]) / mline[1])
        for x in bends:
            i = bisect_right(ffns, x)
            for f in ffns[max(i - 1, 0):i + 1]:
                m = mline[0] + mline[1] * f if mline else 0
                d = self.distance(pline[0] + pline[1] * f, m)
                if self.best is None or d < self.best[0]:
                    self.best = (d, (*key[:4], f))


def _enumerate(src: LlamaShape, tp: int, budget: Budget, limits: SearchLimits) -> tuple[list[Key], Key | None]:
    """Keys of the best grid shapes inside the budget, and the grid shape closest to the budget overall.
    Ranked by parameters when a parameter budget is given, else by memory."""
    def lower(n: int) -> int:
        return -(-n * round(WINDOW * 100) // 100)  # ceil(0.95 * n), in integers

    p_lo, p_hi = (lower(budget.params), budget.params) if budget.params is not None else (None, None)
    m_hi = budget.memory
    m_lo = lower(budget.memory) if budget.memory is not None and budget.params is None else None
    ffns = _widths(src.ffn_hidden_size, limits.width_multiple, limits.max_width_drop, divisor=tp)
    best = _Best(budget.params if budget.params is not None else budget.memory, limits.candidates)
    closest = _Closest(budget)
    for hidden in _widths(src.hidden_size, limits.width_multiple, limits.max_width_drop):
        for heads, groups in _attention(src, tp, limits.max_width_drop):
            if not _hf_loadable(src, hidden, heads, groups):
                continue
            pl = _Line(lambda k: _params(src, k), hidden, heads, groups)
            ml = _Line(lambda k: budget.memory_of(_fields(src, k)), hidden, heads, groups) if m_hi else None
            for layers in _kept_range(src.num_layers, limits.max_depth_drop):
                key = (layers, hidden, heads, groups, 0)
                pline, mline = pl.at(layers), ml.at(layers) if ml else None
                lo, hi = _window(p_lo, p_hi, *pline)
                if mline:
                    m_f = _window(m_lo, m_hi, *mline)
                    lo, hi = max(lo, m_f[0]), min(hi, m_f[1])
                rank = pline if budget.params is not None else mline
                i0, i1 = bisect_left(ffns, lo), bisect_right(ffns, hi)
                for f in ffns[max(i0, i1 - limits.candidates):i1]:  # the largest fit best
                    best.add(rank[0] + rank[1] * f, (*key[:4], f))
                closest.add(ffns, key, pline, mline)
    return best.keys(), closest.best[1] if closest.best else None


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


def _candidate(src: LlamaShape, tp: int, budget: Budget, key: Key) -> Candidate:
    """The grid is built to pass validation; a shape that does not is a bug here, not a user error."""
    try:
        shape = validate(src, tp, key)
    except (PlanError, ShapeError) as e:
        raise RuntimeError(f"the search space produced an invalid shape {key}: {e}") from e
    memory = budget.memory_of(shape) if budget.memory is not None else None
    return Candidate(shape=shape, params=shape.num_params(), budget=budget, memory=memory)


def _describe(c: Candidate) -> str:
    b, parts = c.budget, [f"{c.params:,} params"]
    if b.params is not None:
        parts[0] += f" ({100 * c.params / b.params:.2f}% of the parameter budget)"
    if b.memory is not None:
        parts.append(f"{c.memory / GiB:.4g} GiB ({100 * c.memory / b.memory:.2f}% of the memory budget)")
    return " and ".join(parts)


def search(src: LlamaShape, tp: int, budget: Budget | int, limits: SearchLimits = SearchLimits()
           ) -> list[Candidate]:
    """The `limits.candidates` valid shapes closest to the budget from below (an int: a parameter count): within
    95-100% of the parameters (or of the memory when only memory is given) and at most the memory; ties: deeper,
    then wider first. Raises BudgetError naming the closest shape and the budget when none fits."""
    budget = Budget(params=budget) if isinstance(budget, int) else budget
    inside, closest = _enumerate(src, tp, budget, limits)
    if inside:
        return [_candidate(src, tp, budget, key) for key in inside]
    near = _candidate(src, tp, budget, closest) if closest else None
    hint = f"closest: {near.line()} with {_describe(near)}" if near else "no shape passes the limits at all"
    flags = ", ".join(f for f, given in (("--target-params", budget.params), ("--target-memory-gb", budget.memory),
                                         ("--memory-seq-length", budget.memory)) if given is not None)
    raise BudgetError(f"no shape within {100 * WINDOW:.0f}-100% of {budget.describe()} at TP {tp} (width multiple "
                      f"{limits.width_multiple}, at most {limits.max_depth_drop:g} of layers and "
                      f"{limits.max_width_drop:g} of widths dropped); {hint}; loosen --width-multiple, "
                      f"--max-width-drop or --max-depth-drop, or change {flags}")
