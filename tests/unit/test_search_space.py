"""The budget search space (--target-params): parameter counts against transformers, every candidate against the
validation hand-given sizes get, and the search against a brute-force enumeration written here."""

from __future__ import annotations

import itertools
import re

import pytest

from megatron_prune.config.shape import LlamaShape, ShapeError, count_params
from megatron_prune.errors import UserError
from megatron_prune.prune.plan import PlanError
from megatron_prune.prune.search_space import BudgetError, SearchLimits, parse_budget, search
from megatron_prune.prune.select import PruneTarget
from tests.helpers import llama_config

SMOL = LlamaShape(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
                  kv_channels=64, vocab_size=49152, tie_word_embeddings=True)  # SmolLM2-135M, the demo model


# ----------------------------------------------------------------------------- the parameter count
@pytest.mark.parametrize("overrides", [
    dict(),                                                             # GQA 4/2, untied
    dict(tie_word_embeddings=True),                                     # tied
    dict(num_attention_heads=8, num_key_value_heads=8, head_dim=8),     # MHA
    dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24, intermediate_size=40),  # head_dim != h/heads
    dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=6, num_key_value_heads=3, vocab_size=300,
         tie_word_embeddings=True),
])
def test_count_params_matches_transformers(overrides):
    from transformers import LlamaForCausalLM

    cfg = llama_config(**overrides)
    model = LlamaForCausalLM(cfg)
    want = sum(p.numel() for p in model.parameters())  # tied weights are one parameter
    shape = LlamaShape.from_hf_config(cfg.to_dict())
    assert shape.num_params() == want
    assert count_params(shape.num_layers, shape.hidden_size, shape.ffn_hidden_size, shape.num_attention_heads,
                        shape.num_query_groups, shape.kv_channels, shape.vocab_size,
                        shape.tie_word_embeddings) == want


def test_demo_shape_count_matches_the_readme():
    pruned = SMOL.replace(num_layers=20, hidden_size=480, num_attention_heads=6, ffn_hidden_size=1020)
    assert SMOL.num_params() == 134_515_008 and pruned.num_params() == 64_047_840


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("text, want", [("64047840", 64_047_840), ("6.4e7", 64_000_000), ("50%", 50_000),
                                        (" 12.5% ", 12_500), (64_047_840, 64_047_840)])
def test_parse_budget(text, want):
    assert parse_budget(text, 100_000 if "%" in str(text) else 134_515_008) == want


@pytest.mark.parametrize("text, message", [("abc", "expected a parameter count"), ("0", "not a positive"),
                                           ("-5%", "not a positive"), ("2e8", "exceeds the source"),
                                           ("150%", "exceeds the source"), ("nan", "not a positive")])
def test_parse_budget_rejects(text, message):
    with pytest.raises(BudgetError, match=message) as e:
        parse_budget(text, 134_515_008)
    assert isinstance(e.value, UserError)


# ----------------------------------------------------------------------------- candidates
SOURCES = {  # name: (source, tp, budget fraction, limits)
    "gqa-tp2": (LlamaShape(num_layers=8, hidden_size=96, ffn_hidden_size=256, num_attention_heads=8,
                           num_query_groups=4, kv_channels=16, vocab_size=500), 2, 0.6, SearchLimits(8)),
    "mha-tp2": (LlamaShape(num_layers=6, hidden_size=128, ffn_hidden_size=344, num_attention_heads=8,
                           num_query_groups=8, kv_channels=16, vocab_size=512, tie_word_embeddings=True), 2, 0.55,
                SearchLimits(16, max_depth_drop=0.4, max_width_drop=0.6, candidates=12)),
    "smol-tp3": (SMOL, 3, 0.5, SearchLimits(32)),
    "smol-tp3-128": (SMOL, 3, 0.5, SearchLimits()),
}


def hand_validated(src: LlamaShape, tp: int, s: LlamaShape) -> LlamaShape:
    """What a user giving these sizes by hand gets: PruneTarget.resolve + the TP split + transformers' rule."""
    target = PruneTarget(hidden_size=s.hidden_size, num_attention_heads=s.num_attention_heads,
                         num_query_groups=s.num_query_groups, ffn_hidden_size=s.ffn_hidden_size,
                         num_layers=s.num_layers).resolve(src, tp)
    target.check_parallel(tp)
    assert target.hidden_size % target.num_attention_heads == 0  # transformers >= 5 LlamaConfig
    return target


def brute_force(src: LlamaShape, tp: int, limits: SearchLimits) -> list[tuple[int, LlamaShape]]:
    """Every shape inside the limits that hand validation accepts, with its parameter count, by plain loops."""
    m, wd, dd = limits.width_multiple, limits.max_width_drop, limits.max_depth_drop

    def widths(n):
        return [v for v in range(1, n + 1) if (v % m == 0 or v == n) and n - v <= n * wd]

    mha = src.num_query_groups == src.num_attention_heads
    def counts(n):  # head counts are not widths: no multiple
        return [v for v in range(1, n + 1) if n - v <= n * wd]

    heads = counts(src.num_attention_heads) if mha else [src.num_query_groups * k for k in counts(src.heads_per_group)]
    out = []
    for layers, hidden, h, ffn in itertools.product(
            [n for n in range(1, src.num_layers + 1) if src.num_layers - n <= src.num_layers * dd],
            widths(src.hidden_size), heads, widths(src.ffn_hidden_size)):
        groups = h if mha else src.num_query_groups
        s = src.replace(num_layers=layers, hidden_size=hidden, num_attention_heads=h, num_query_groups=groups,
                        ffn_hidden_size=ffn)
        try:
            hand_validated(src, tp, s)
        except (PlanError, ShapeError, AssertionError):
            continue
        out.append((s.num_params(), s))
    return out


@pytest.mark.parametrize("name", list(SOURCES))
def test_candidates_pass_hand_validation_and_meet_the_budget(name):
    src, tp, frac, limits = SOURCES[name]
    budget = int(src.num_params() * frac)
    cands = search(src, tp, budget, limits)
    assert 1 <= len(cands) <= limits.candidates
    for c in cands:
        assert hand_validated(src, tp, c.shape) == c.shape
        assert c.params == c.shape.num_params() and 0.95 * budget <= c.params <= budget
        for got, orig in ((c.shape.hidden_size, src.hidden_size), (c.shape.ffn_hidden_size, src.ffn_hidden_size)):
            assert got == orig or got % limits.width_multiple == 0
        assert c.shape.num_layers >= src.num_layers * (1 - limits.max_depth_drop)
        assert c.shape.hidden_size >= src.hidden_size * (1 - limits.max_width_drop)
    gaps = [budget - c.params for c in cands]
    assert gaps == sorted(gaps)


@pytest.mark.parametrize("name", list(SOURCES))
def test_search_keeps_the_closest_of_a_brute_force_enumeration(name):
    src, tp, frac, limits = SOURCES[name]
    budget = int(src.num_params() * frac)
    every = brute_force(src, tp, limits)
    inside = sorted((budget - p, s) for p, s in every if 0.95 * budget <= p <= budget)
    cands = search(src, tp, budget, limits)
    assert [budget - c.params for c in cands] == [gap for gap, _ in inside[:limits.candidates]]
    shapes = {s for _, s in inside}
    assert all(c.shape in shapes for c in cands)


def test_demo_shape_is_found_first_for_the_demo_budget():
    cands = search(SMOL, 3, 64_047_840, SearchLimits(width_multiple=4))
    s = cands[0].shape
    assert (s.num_layers, s.hidden_size, s.num_attention_heads, s.ffn_hidden_size) == (20, 480, 6, 1020)
    assert cands[0].fraction == 1.0


def test_unreachable_budget_names_the_closest_shape():
    src, tp, _, limits = SOURCES["gqa-tp2"]
    budget = int(src.num_params() * 0.1)  # below what the limits (half the layers and widths) allow
    with pytest.raises(BudgetError, match="no shape within 95-100%") as e:
        search(src, tp, budget, limits)
    closest = min(abs(p - budget) for p, _ in brute_force(src, tp, limits))
    m = re.search(r"closest: layers=(\d+) hidden=(\d+) heads=(\d+)/(\d+) ffn=(\d+) with ([\d,]+) params",
                  str(e.value))
    assert m, str(e.value)
    layers, hidden, heads, groups, ffn = map(int, m.groups()[:5])
    named = src.replace(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                        ffn_hidden_size=ffn)
    assert named.num_params() == int(m.group(6).replace(",", "")) and abs(named.num_params() - budget) == closest
    assert isinstance(e.value, UserError) and hand_validated(src, tp, named) == named


@pytest.mark.parametrize("kw, message", [(dict(width_multiple=0), "--width-multiple"),
                                         (dict(max_depth_drop=1.0), "--max-depth-drop"),
                                         (dict(max_width_drop=-0.1), "--max-width-drop"),
                                         (dict(candidates=0), "--search-candidates")])
def test_limits_are_checked(kw, message):
    with pytest.raises(BudgetError, match=message):
        SearchLimits(**kw)


# ----------------------------------------------------------------------------- CLI: prune --target-params --dry-run
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from megatron_prune.checkpoint.convert_files import hf_to_megatron
    from tests.helpers import make_hf_model

    root = tmp_path_factory.mktemp("search")
    make_hf_model(root / "hf", num_attention_heads=8, num_key_value_heads=4)
    hf_to_megatron(root / "hf", root / "tp2", tp=2, progress=False)
    return root


def _prune(ckpt, *argv):
    from megatron_prune.__main__ import main

    return main(["prune", "--load", str(ckpt / "tp2"), "--save", str(ckpt / "out"), *argv])


def test_cli_dry_run_prints_the_table_and_writes_nothing(ckpt, capsys):
    rc = _prune(ckpt, "--target-params", "60%", "--width-multiple", "8", "--search-candidates", "3", "--dry-run")
    out = capsys.readouterr().out
    assert rc == 0 and not (ckpt / "out").exists()
    rows = [line.split() for line in out.splitlines() if re.match(r"\s*\d+\s+layers=", line)]
    assert [r[0] for r in rows] == ["1", "2", "3"] and "% of budget" in out
    src = LlamaShape(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=4,
                     kv_channels=16, vocab_size=512)
    budget = round(0.6 * src.num_params())
    for r in rows:
        sizes = dict(kv.split("=") for kv in r[1:5])
        heads, groups = map(int, sizes["heads"].split("/"))
        s = src.replace(num_layers=int(sizes["layers"]), hidden_size=int(sizes["hidden"]), num_attention_heads=heads,
                        num_query_groups=groups, ffn_hidden_size=int(sizes["ffn"]))
        assert int(r[5].replace(",", "")) == s.num_params() and 0.95 * budget <= s.num_params() <= budget


@pytest.mark.parametrize("argv, message", [
    (["--target-params", "60%"], "add --dry-run"),
    (["--target-params", "60%", "--dry-run", "--hidden-size-remain", "32"], "do not also give sizes"),
    (["--dry-run", "--hidden-size-remain", "32"], "--dry-run goes with --target-params"),
    (["--target-params", "1000", "--dry-run"], r"tp2: no shape within 95-100% of 1,000 params at TP 2.*closest: "),
    (["--target-params", "lots", "--dry-run"], "expected a parameter count"),
])
def test_cli_budget_errors_are_one_line(ckpt, capsys, argv, message):
    rc = _prune(ckpt, *argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and re.search(message, err), err
    assert not (ckpt / "out").exists()
