"""What the prune CLI prints about shapes: the search space's table of a budget (`--dry-run`), the column aligner that
the search report's table (search_run.SearchReport.table) uses too, and the warning for hand-given widths off the
--width-multiple grid. Text only: nothing here decides anything.
"""

from __future__ import annotations

from megatron_prune.config.shape import GiB
from megatron_prune.prune.search_space import Space

QUANT_REASON = ("group-quantized W4A16/W8A16 (group size 128, e.g. llmcompressor) need every quantized linear's "
                "input columns % 128 == 0, and tensor-core GEMM tiles want multiples of 64/128")


def format_table(space: Space, rows: int = 30) -> str:
    """The maximal shapes of a search space, closest to the budget first (at most `rows`, then how many more):
    rank, shape, params, % of the parameter budget; memory (GiB) and % of the memory budget when there is one;
    whether transformers loads it when --megatron-only-shapes let in shapes it does not."""
    cands, b = space.shapes, space.budget
    mixed = space.limits.megatron_only_shapes
    head = ["rank", "shape", "params"] + (["% of budget"] if b.params is not None else [])
    head += ["memory GiB", "% of memory budget"] if b.memory is not None else []
    head += ["HF"] if mixed else []
    table = [tuple(head)]
    for i, c in enumerate(cands[:rows], 1):
        row = [str(i), c.line(), f"{c.params:,}"]
        row += [f"{100 * c.params / b.params:.2f}%"] if b.params is not None else []
        row += [f"{c.memory / GiB:.4f}", f"{100 * c.memory / b.memory:.2f}%"] if b.memory is not None else []
        row += ["yes" if c.hf_loadable else "no"] if mixed else []
        table.append(tuple(row))
    more = f"\n({len(cands) - rows} more maximal shapes)" if len(cands) > rows else ""
    return align_table(table) + more


def align_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells as aligned text: column 1 (the shape) left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.rjust(w) if i != 1 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)


def width_warning(multiple: int, **widths: int | None) -> str | None:
    """One warning line for hand-given widths (hidden=..., ffn=...) that are not multiples of `multiple`, or None.
    Not an error: the shape is valid and trains; it only cannot be group-quantized or tiled well."""
    bad = [f"{name} {w}" for name, w in widths.items() if w is not None and w % multiple]
    if not bad:
        return None
    return (f"warning: {' and '.join(bad)} not a multiple of --width-multiple {multiple}: {QUANT_REASON}; round "
            f"the width, or set --width-multiple to silence this")
