"""The budget search space: pruned shapes of a source model that meet a budget (Budget): a parameter count, an
inference memory size in bytes, or both (the parameters as the target and the memory as a ceiling). Pure: no I/O,
no processes. Which shape is best (the importance proxy, then the loss) is decided elsewhere (search_proxy,
search_run).

Axes: num_layers, hidden_size, heads per query group and ffn_hidden_size. A GQA model keeps its query groups and
loses heads inside them; an MHA model stays MHA (heads = groups), as a hand-given `--num-attention-heads-remain`
does (select.PruneTarget). A valid shape is
- reachable at the checkpoint's TP in balance mode: it passes PruneTarget.resolve and LlamaShape.check_parallel,
  the same validation as hand-given sizes;
- loadable by HF transformers (hidden % heads == 0, config.shape.hf_config_warning; transformers >= 5 requires
  it), unless `megatron_only_shapes`: then also the shapes only megatron-core runs;
- made of widths (hidden, FFN) that are multiples of `width_multiple`, or the source's own width. The multiple is
  for quantization and GEMM tiles, which see widths; layer and head counts take any value;
- within the limits: at most `max_depth_drop` of the layers and `max_width_drop` of each width (hidden, heads
  per group or MHA heads, FFN) removed - of the source's sizes, or of `limits.reference`'s (the original model of
  an already pruned source: several rounds then stay within the limits together, as one prune would).

The window: valid shapes within [lower x budget, budget] of the parameters (or of the memory when only memory is
given; with both, also at most the memory). `lower` starts at 95% and widens by 5 points while the window holds
fewer than `candidates` maximal shapes, down to 80%: on a coarse grid (a small model at multiple 128 and TP 3)
only a handful of shapes land in 95-100%, and the best use of the budget may sit at 90%.

Maximal shapes: a valid shape is maximal when no single step up of one axis (one more layer; the next valid
hidden width, head count or FFN width) still fits the budget. The pruner keeps the most important units of each
axis with nested selections (top-k hidden channels, heads, FFN channels per TP partition; layers dropped by lowest
Block Influence), so a non-maximal shape keeps a subset of the units some valid shape in budget keeps: it is never
the better use of the budget by the importance the plan is made from. Only maximal shapes are ranked; at most one
per (layers, hidden, heads), the widest FFN that fits.

The parameter count is config.shape.count_params, LlamaShape's own formula; memory is
config.shape.inference_memory_bytes (weights + KV cache). Both are linear in the FFN width for fixed (layers,
hidden, heads), so for each (layers, hidden, heads) the FFN widths in the window come from one bisection per bound
instead of a scan: a 7B-sized space stays fast even at multiple 8.

The budget itself (parsing the flags) is prune.budget's; the tables and the width warning for hand-given sizes
are prune.display's.
"""

from __future__ import annotations

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
WINDOW = 0.95        # the window starts at 95-100% of the budget,
WIDEN_STEP = 0.05    # widens by 5 points while it holds fewer than `candidates` maximal shapes,
WINDOW_FLOOR = 0.80  # down to 80%: below that a shape is no longer what the user asked for
LOWERS = tuple(round(WINDOW - i * WIDEN_STEP, 2) for i in range(round((WINDOW - WINDOW_FLOOR) / WIDEN_STEP) + 1))


# Default drop limits (0.5), measured on SmolLM2-135M at the demo's budget (47% of the parameters, TP 3, activation
# importance, loss on held-apart windows): with 0.7 instead, the 12 closest shapes include 7 that remove more than
# half of a width or of the layers; every one of them lost to the 0.5-limit pick (loss 8.2-13.5 vs 5.88; 3 of 9
# heads per model: 10.5-11.6), which stayed the winner. Beyond half, candidates mostly crowd out useful ones.
@dataclass(frozen=True)
class SearchLimits:
    width_multiple: int = DEFAULT_WIDTH_MULTIPLE
    max_depth_drop: float = 0.5   # fraction of the layers that may be dropped
    max_width_drop: float = 0.5   # fraction of each width (hidden, heads, FFN) that may be removed
    candidates: int = 8           # how many shapes (the proxy's best) are evaluated by their loss
    megatron_only_shapes: bool = False  # also shapes transformers >= 5 cannot load (hidden % heads != 0)
    # the sizes the drop limits are measured from (None: the source's): the original model when the source is
    # already pruned, so that rounds of pruning stay within the limits together (`prune --limits-of`)
    reference: LlamaShape | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.width_multiple, int) or self.width_multiple < 1:
            raise BudgetError(f"--width-multiple must be a positive integer, got {self.width_multiple!r}")
        for name in ("max_depth_drop", "max_width_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise BudgetError(f"--{name.replace('_', '-')} must be a fraction in [0, 1), got {getattr(self, name)}")
        if self.candidates < 1:
            raise BudgetError(f"--search-candidates must be >= 1, got {self.candidates}")

    def shape_set(self) -> str:
        return ("megatron-core shapes (--megatron-only-shapes: transformers >= 5 cannot load hidden % heads != 0)"
                if self.megatron_only_shapes else "shapes HF transformers loads (hidden % heads == 0)")


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

    @property
    def hf_loadable(self) -> bool:
        return hf_config_warning(self.shape) is None

    def line(self) -> str:
        return shape_line(self.shape)


@dataclass(frozen=True)
class Space:
    """The valid shapes of a budget: how many the window holds, and its maximal ones (closest to the budget first;
    ties: deeper, then wider)."""
    budget: Budget
    limits: SearchLimits
    lower: float                     # the window is [lower x budget, budget]
    valid: int                       # valid shapes in the window, maximal or not
    shapes: tuple[Candidate, ...]    # the maximal ones

    @property
    def widened(self) -> bool:
        return self.lower < WINDOW

    def window(self) -> str:
        text = f"{100 * self.lower:.0f}-100%"
        if self.widened:
            text += (f" (widened from {100 * WINDOW:.0f}% in {100 * WIDEN_STEP:.0f}-point steps: fewer than "
                     f"{self.limits.candidates} maximal shapes fit above)")
        return text

    def describe(self) -> str:
        """'window 95-100%: 614 valid shapes HF transformers loads (...), width multiple 8; 133 of them maximal
        (...)'"""
        return (f"window {self.window()}: {self.valid:,} valid {self.limits.shape_set()}, width multiple "
                f"{self.limits.width_multiple}; {len(self.shapes)} of them maximal (no layer, head or width step "
                f"up fits the budget)")

    def to_json(self) -> dict:
        ref = self.limits.reference
        return {"window": [self.lower, 1.0], "widened": self.widened, "valid_shapes": self.valid,
                "maximal_shapes": len(self.shapes), "width_multiple": self.limits.width_multiple,
                "megatron_only_shapes": self.limits.megatron_only_shapes,
                **({"limits_of": ref.to_dict()} if ref is not None else {})}


# ----------------------------------------------------------------------------- axes
def _kept_range(n: int, drop: float, ref: int | None = None) -> range:
    """n' in [ref - floor(ref * drop), n] (ref: n unless given): at most `drop` of ref removed, at least 1 kept;
    n alone when n is below that already."""
    ref = n if ref is None else ref
    return range(min(n, max(1, ref - math.floor(ref * drop))), n + 1)


def _widths(n: int, multiple: int, drop: float, divisor: int = 1, ref: int | None = None) -> list[int]:
    """Multiples of `multiple` (and `divisor`) that keep at least (1 - drop) of ref (default n), plus n itself,
    ascending."""
    out = {v for v in _kept_range(n, drop, ref) if v % multiple == 0 and v % divisor == 0}
    return sorted(out | {n})


def _attention(src: LlamaShape, tp: int, drop: float, ref: LlamaShape | None = None) -> list[tuple[int, int]]:
    """(heads, groups) options, ascending. GQA keeps its groups; MHA stays MHA and needs groups % TP == 0."""
    ref = ref or src
    g0 = src.num_query_groups
    if g0 == src.num_attention_heads:
        return [(h, h) for h in _kept_range(g0, drop, ref.num_attention_heads) if h % tp == 0]
    return [(g0 * k, g0) for k in _kept_range(src.heads_per_group, drop, ref.heads_per_group)]


def shape_line(s: LlamaShape) -> str:
    """'layers=20 hidden=480 heads=6/3 ffn=1020': the searched sizes of a shape."""
    return (f"layers={s.num_layers} hidden={s.hidden_size} heads={s.num_attention_heads}/{s.num_query_groups} "
            f"ffn={s.ffn_hidden_size}")


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


class _Grid:
    """The valid axes of a search: FFN widths, hidden widths, (heads, groups) options, layer counts, and the
    budget's bounds; `fits` is the ceiling (at most the parameters and the memory)."""

    def __init__(self, src: LlamaShape, tp: int, budget: Budget, limits: SearchLimits):
        self.src, self.budget, self.limits = src, budget, limits
        ref, m, wd = limits.reference or src, limits.width_multiple, limits.max_width_drop
        self.ffns = _widths(src.ffn_hidden_size, m, wd, divisor=tp, ref=ref.ffn_hidden_size)
        self.hiddens = _widths(src.hidden_size, m, wd, ref=ref.hidden_size)
        self.attention = _attention(src, tp, wd, ref)
        self.layers = _kept_range(src.num_layers, limits.max_depth_drop, ref.num_layers)

        allowed = {(h, a): self._loadable(h, *a) for h in self.hiddens for a in self.attention}
        self.pairs = [(h, a) for (h, a), ok in allowed.items() if ok]  # (hidden, (heads, groups)) of valid shapes
        # the next valid step up of hidden (same heads) and of heads (same hidden), for the maximality test
        self.next_hidden = {(h, a): next((h2 for h2 in self.hiddens if h2 > h and allowed[h2, a]), None)
                            for h, a in self.pairs}
        self.next_heads = {(h, a): next((a2 for a2 in self.attention if a2[0] > a[0] and allowed[h, a2]), None)
                           for h, a in self.pairs}

    def _loadable(self, hidden: int, heads: int, groups: int) -> bool:
        if self.limits.megatron_only_shapes:
            return True
        return hf_config_warning(self.src.replace(hidden_size=hidden, num_attention_heads=heads,
                                                  num_query_groups=groups)) is None

    def fits(self, key: Key) -> bool:
        b = self.budget
        return ((b.params is None or _params(self.src, key) <= b.params)
                and (b.memory is None or b.memory_of(_fields(self.src, key)) <= b.memory))

    def rank_value(self, key: Key) -> int:
        """What the window and the order are measured in: parameters, or memory when only memory is given."""
        return _params(self.src, key) if self.budget.params is not None else self.budget.memory_of(
            _fields(self.src, key))

    def step_ups(self, key: Key) -> list[Key]:
        """`key` with one axis one valid step larger (the FFN step is left out: the window's bisection already
        took the widest FFN that fits)."""
        layers, hidden, heads, groups, ffn = key
        ups = [(layers + 1, hidden, heads, groups, ffn)] if layers < self.src.num_layers else []
        h2, a2 = self.next_hidden[hidden, (heads, groups)], self.next_heads[hidden, (heads, groups)]
        ups += [(layers, h2, heads, groups, ffn)] if h2 is not None else []
        ups += [(layers, hidden, *a2, ffn)] if a2 is not None else []
        return ups


def _lower_bound(n: int, fraction: float) -> int:
    return -(-n * round(fraction * 100) // 100)  # ceil(fraction * n), in integers


def _enumerate(grid: _Grid) -> tuple[dict[float, int], list[tuple[int, Key]], Key | None]:
    """({lower: valid shapes in [lower x budget, budget]} for every lower in LOWERS, [(rank value, key)] of the
    maximal shapes in the widest window, the grid shape closest to the budget overall)."""
    budget, ffns = grid.budget, grid.ffns
    target = budget.params if budget.params is not None else budget.memory
    bounds = {lower: _lower_bound(target, lower) for lower in LOWERS}
    counts, maximal, closest = dict.fromkeys(LOWERS, 0), [], _Closest(budget)
    for hidden, (heads, groups) in grid.pairs:
        pl = _Line(lambda k: _params(grid.src, k), hidden, heads, groups)
        ml = _Line(lambda k: budget.memory_of(_fields(grid.src, k)), hidden, heads, groups) \
            if budget.memory is not None else None
        for layers in grid.layers:
            key = (layers, hidden, heads, groups, 0)
            pline, mline = pl.at(layers), ml.at(layers) if ml else None
            closest.add(ffns, key, pline, mline)
            rank = pline if budget.params is not None else mline
            ceiling = min(_window(None, budget.params, *pline)[1] if budget.params is not None else math.inf,
                          _window(None, budget.memory, *mline)[1] if mline else math.inf)
            top = bisect_right(ffns, ceiling)  # ffns[:top] fit the budget's ceiling
            for lower, lo in bounds.items():
                counts[lower] += max(0, top - bisect_left(ffns, _window(lo, None, *rank)[0]))
            if not top:
                continue
            widest = (*key[:4], ffns[top - 1])
            value = rank[0] + rank[1] * widest[4]
            if value >= bounds[LOWERS[-1]] and not any(grid.fits(u) for u in grid.step_ups(widest)):
                maximal.append((value, widest))
    return counts, maximal, closest.best[1] if closest.best else None


def validate(src: LlamaShape, tp: int, key: Key, hf_only: bool = True) -> LlamaShape:
    """The shape of `key` through the same checks as hand-given sizes; raises PlanError / ShapeError otherwise."""
    layers, hidden, heads, groups, ffn = key
    target = PruneTarget(hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                         ffn_hidden_size=ffn, num_layers=layers, mode="balance").resolve(src, tp)
    target.check_parallel(tp)
    warning = hf_config_warning(target)
    if warning and hf_only:
        raise PlanError(warning)
    return target


def _candidate(src: LlamaShape, tp: int, budget: Budget, key: Key, hf_only: bool) -> Candidate:
    """The grid is built to pass validation; a shape that does not is a bug here, not a user error."""
    try:
        shape = validate(src, tp, key, hf_only)
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


def find_space(src: LlamaShape, tp: int, budget: Budget | int, limits: SearchLimits = SearchLimits()) -> Space:
    """The window and its maximal shapes (an int budget: a parameter count). The window starts at 95-100% and
    widens (WIDEN_STEP, down to WINDOW_FLOOR) while it holds fewer than `limits.candidates` maximal shapes.
    Raises BudgetError naming the closest shape and the budget when no shape fits even the widest window."""
    budget = Budget(params=budget) if isinstance(budget, int) else budget
    grid = _Grid(src, tp, budget, limits)
    counts, maximal, closest = _enumerate(grid)
    target = budget.params if budget.params is not None else budget.memory
    hf_only = not limits.megatron_only_shapes
    for lower in LOWERS:
        inside = [(v, k) for v, k in maximal if v >= _lower_bound(target, lower)]
        if len(inside) >= limits.candidates or (lower == LOWERS[-1] and inside):
            inside.sort(key=lambda vk: (-vk[0], *(-x for x in vk[1])))  # closest; ties: deeper, then wider
            shapes = tuple(_candidate(src, tp, budget, k, hf_only) for _, k in inside)
            return Space(budget=budget, limits=limits, lower=lower, valid=counts[lower], shapes=shapes)
    near = _candidate(src, tp, budget, closest, hf_only) if closest else None
    hint = f"closest: {near.line()} with {_describe(near)}" if near else "no shape passes the limits at all"
    flags = ", ".join(f for f, given in (("--target-params", budget.params), ("--target-memory-gb", budget.memory),
                                         ("--memory-seq-length", budget.memory)) if given is not None)
    more = "" if limits.megatron_only_shapes else ", --megatron-only-shapes"
    of = f" of {shape_line(limits.reference)}" if limits.reference else ""
    raise BudgetError(f"no shape within {100 * LOWERS[-1]:.0f}-100% of {budget.describe()} at TP {tp} (width "
                      f"multiple {limits.width_multiple}, at most {limits.max_depth_drop:g} of layers and "
                      f"{limits.max_width_drop:g} of widths dropped{of}, {limits.shape_set()}); {hint}; loosen "
                      f"--width-multiple, --max-width-drop or --max-depth-drop{more}, or change {flags}")
