"""The budget search space (--target-params): parameter counts against transformers, every candidate against the
validation hand-given sizes get, and the search against a brute-force enumeration written here."""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest

from megatron_prune.config.shape import LlamaShape, ShapeError, count_params
from megatron_prune.errors import UserError
from megatron_prune.prune.plan import PlanError
from megatron_prune.prune.budget import BudgetError, parse_budget
from megatron_prune.prune.search_space import SearchLimits, find_space
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
    "smol-tp3-128": (SMOL, 3, 0.5, SearchLimits()),   # widens: few HF-loadable shapes at multiple 128
    "smol-tp3-128-mc": (SMOL, 3, 0.5, SearchLimits(128, megatron_only_shapes=True)),
    "mha-tp2-mc": (LlamaShape(num_layers=6, hidden_size=120, ffn_hidden_size=344, num_attention_heads=8,
                              num_query_groups=8, kv_channels=16, vocab_size=512), 2, 0.55,
                   SearchLimits(8, megatron_only_shapes=True, candidates=5)),  # hidden 120: 8 heads do not divide it
    # round 2 of `compress --steps 2`: a pruned source, the limits measured from the original (--limits-of)
    "smol-round2-tp1": (SMOL.replace(num_layers=22, hidden_size=512, ffn_hidden_size=1152), 1, 0.5,
                        SearchLimits(32, reference=SMOL)),
    # a source already below the reference's floor on hidden (40 < 96 / 2) and heads per group (1 of 2 kept)
    "gqa-round2-below": (LlamaShape(num_layers=6, hidden_size=40, ffn_hidden_size=200, num_attention_heads=4,
                                    num_query_groups=4, kv_channels=16, vocab_size=500), 2, 0.8,
                         SearchLimits(8, reference=LlamaShape(num_layers=8, hidden_size=96, ffn_hidden_size=256,
                                                              num_attention_heads=8, num_query_groups=4,
                                                              kv_channels=16, vocab_size=500))),
}
ROUND2 = {"smol-round2-tp1": SMOL.num_params() * 0.4}   # budgets given in parameters of the original


def hand_validated(src: LlamaShape, tp: int, s: LlamaShape, hf: bool = True) -> LlamaShape:
    """What a user giving these sizes by hand gets: PruneTarget.resolve + the TP split + transformers' rule (hf)."""
    target = PruneTarget(hidden_size=s.hidden_size, num_attention_heads=s.num_attention_heads,
                         num_query_groups=s.num_query_groups, ffn_hidden_size=s.ffn_hidden_size,
                         num_layers=s.num_layers).resolve(src, tp)
    target.check_parallel(tp)
    assert not hf or target.hidden_size % target.num_attention_heads == 0  # transformers >= 5 LlamaConfig
    return target


def brute_force(src: LlamaShape, tp: int, limits: SearchLimits) -> list[tuple[int, LlamaShape]]:
    """Every shape inside the limits that hand validation accepts, with its parameter count, by plain loops
    (transformers' rule too, unless limits.megatron_only_shapes). Sizes never grow; the limits are fractions of
    limits.reference's sizes when given (the source's own size always allowed)."""
    m, wd, dd = limits.width_multiple, limits.max_width_drop, limits.max_depth_drop
    ref = limits.reference or src

    def widths(n, r):
        return [v for v in range(1, n + 1) if (v % m == 0 or v == n) and (r - v <= r * wd or v == n)]

    mha = src.num_query_groups == src.num_attention_heads
    def counts(n, r):  # head counts are not widths: no multiple
        return [v for v in range(1, n + 1) if r - v <= r * wd or v == n]

    heads = counts(src.num_attention_heads, ref.num_attention_heads) if mha else [
        src.num_query_groups * k for k in counts(src.heads_per_group, ref.heads_per_group)]
    out = []
    for layers, hidden, h, ffn in itertools.product(
            [n for n in range(1, src.num_layers + 1) if ref.num_layers - n <= ref.num_layers * dd
             or n == src.num_layers],
            widths(src.hidden_size, ref.hidden_size), heads, widths(src.ffn_hidden_size, ref.ffn_hidden_size)):
        groups = h if mha else src.num_query_groups
        s = src.replace(num_layers=layers, hidden_size=hidden, num_attention_heads=h, num_query_groups=groups,
                        ffn_hidden_size=ffn)
        try:
            hand_validated(src, tp, s, hf=not limits.megatron_only_shapes)
        except (PlanError, ShapeError, AssertionError):
            continue
        out.append((s.num_params(), s))
    return out


AXES = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")


def brute_maximal(every: list[tuple[int, LlamaShape]], fits) -> set[LlamaShape]:
    """Shapes that fit, and no valid shape larger on one axis (the others equal) fits: by pairwise comparison."""
    ok = [s for _, s in every if fits(s)]
    def grows(a, b):  # b is a larger on exactly one axis
        diff = [x for x in AXES if getattr(a, x) != getattr(b, x)]
        return len(diff) == 1 and getattr(b, diff[0]) > getattr(a, diff[0])
    return {a for a in ok if not any(grows(a, b) for b in ok)}


def brute_space(src, tp, limits, budget: int):
    """(window lower bound, valid shapes in the window, maximal shapes in it) by the rule the module documents:
    95-100%, widened by 5 points while fewer than `candidates` maximal shapes fit, down to 80%."""
    every = brute_force(src, tp, limits)
    maximal = brute_maximal(every, lambda s: s.num_params() <= budget)
    for lower in (0.95, 0.90, 0.85, 0.80):
        inside = {s for s in maximal if s.num_params() >= math.ceil(lower * budget)}
        if len(inside) >= limits.candidates or lower == 0.80:
            return lower, [s for p, s in every if math.ceil(lower * budget) <= p <= budget], inside


@pytest.mark.parametrize("name", list(SOURCES))
def test_maximal_shapes_pass_hand_validation_and_meet_the_budget(name):
    src, tp, frac, limits = SOURCES[name]
    budget = int(ROUND2.get(name, src.num_params() * frac))
    space = find_space(src, tp, budget, limits)
    assert space.shapes and space.valid >= len(space.shapes)
    for c in space.shapes:
        assert hand_validated(src, tp, c.shape, hf=not limits.megatron_only_shapes) == c.shape
        assert c.params == c.shape.num_params() and space.lower * budget <= c.params <= budget
        for got, orig in ((c.shape.hidden_size, src.hidden_size), (c.shape.ffn_hidden_size, src.ffn_hidden_size)):
            assert got == orig or got % limits.width_multiple == 0
        ref = limits.reference or src
        assert c.shape.num_layers >= min(src.num_layers, ref.num_layers * (1 - limits.max_depth_drop))
        assert c.shape.hidden_size >= min(src.hidden_size, ref.hidden_size * (1 - limits.max_width_drop))
    gaps = [budget - c.params for c in space.shapes]
    assert gaps == sorted(gaps)


@pytest.mark.parametrize("name", list(SOURCES))
def test_space_matches_a_brute_force_enumeration(name):
    """The window (and how far it widened), the count of valid shapes in it and its maximal shapes, against plain
    loops over every shape and pairwise comparisons."""
    src, tp, frac, limits = SOURCES[name]
    budget = int(ROUND2.get(name, src.num_params() * frac))
    lower, inside, maximal = brute_space(src, tp, limits, budget)
    space = find_space(src, tp, budget, limits)
    assert (space.lower, space.valid) == (lower, len(inside))
    assert {c.shape for c in space.shapes} == maximal and len(space.shapes) == len(maximal)


def test_the_multiple_applies_to_widths_only_and_megatron_only_shapes_add_to_the_hf_ones():
    """SmolLM2 at multiple 128, TP 3: heads and layers take any count; the HF set (hidden % heads == 0) is the
    megatron-core set minus the shapes transformers refuses (hidden 384 with 9 heads: ModelOpt's pick)."""
    hf = find_space(SMOL, 3, 64_047_840, SearchLimits(128))
    mc = find_space(SMOL, 3, 64_047_840, SearchLimits(128, megatron_only_shapes=True))
    lines = {c.line() for c in mc.shapes}
    assert "layers=19 hidden=384 heads=9/3 ffn=1536" in lines  # ModelOpt's divisor-128 pick
    assert {c.shape.num_layers for c in mc.shapes} >= {15, 16, 19, 23, 30}  # layer counts off any multiple
    assert all(c.hf_loadable for c in hf.shapes) and not all(c.hf_loadable for c in mc.shapes)
    assert {c.shape for c in hf.shapes if c.params >= 0.95 * 64_047_840} == {
        c.shape for c in mc.shapes if c.hf_loadable} - {c.shape for c in mc.shapes if not c.hf_loadable}
    assert hf.widened and hf.lower == 0.8 and not mc.widened  # 4 HF-loadable maximal shapes fit 95-100%


def test_demo_shape_is_found_first_for_the_demo_budget():
    space = find_space(SMOL, 3, 64_047_840, SearchLimits(width_multiple=4))
    s = space.shapes[0].shape
    assert (s.num_layers, s.hidden_size, s.num_attention_heads, s.ffn_hidden_size) == (20, 480, 6, 1020)
    assert space.shapes[0].fraction == 1.0


def test_unreachable_budget_names_the_closest_shape():
    src, tp, _, limits = SOURCES["gqa-tp2"]
    budget = int(src.num_params() * 0.1)  # below what the limits (half the layers and widths) allow
    with pytest.raises(BudgetError, match="no shape within 80-100%") as e:
        find_space(src, tp, budget, limits)
    closest = min(abs(p - budget) for p, _ in brute_force(src, tp, limits))
    m = re.search(r"closest: layers=(\d+) hidden=(\d+) heads=(\d+)/(\d+) ffn=(\d+) with ([\d,]+) params",
                  str(e.value))
    assert m, str(e.value)
    layers, hidden, heads, groups, ffn = map(int, m.groups()[:5])
    named = src.replace(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                        ffn_hidden_size=ffn)
    assert named.num_params() == int(m.group(6).replace(",", "")) and abs(named.num_params() - budget) == closest
    assert isinstance(e.value, UserError) and hand_validated(src, tp, named) == named
    assert "--megatron-only-shapes" in str(e.value)


def test_limits_of_the_original_keep_a_second_round_within_what_one_prune_may_reach():
    """Round 2 of SmolLM2 to 40% from a 22-layer round-1 shape: with the limits measured from the round's own
    source, it may drop to 13 layers (more than half of the original's 30); measured from the original
    (`--limits-of`), every shape keeps at least 15 layers, hidden 288 and 2 of 3 heads per group."""
    src, budget = SOURCES["smol-round2-tp1"][0], int(ROUND2["smol-round2-tp1"])
    own = find_space(src, 1, budget, SearchLimits(32, candidates=64)).shapes
    assert min(c.shape.num_layers for c in own) < 15   # the limits of one prune alone would be exceeded
    of_original = find_space(src, 1, budget, SearchLimits(32, candidates=64, reference=SMOL))
    assert of_original.shapes and all(c.shape.num_layers >= 15 and c.shape.hidden_size >= 288
                                      and c.shape.num_attention_heads >= 6 for c in of_original.shapes)
    assert of_original.to_json()["limits_of"]["num_layers"] == 30


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
    from tests.helpers import make_hf_model, save_tiny_tokenizer

    root = tmp_path_factory.mktemp("search")
    make_hf_model(root / "hf", num_attention_heads=8, num_key_value_heads=4)
    save_tiny_tokenizer(root / "hf")  # a budget's --check-only reads the held-out windows with it
    hf_to_megatron(root / "hf", root / "tp2", tp=2, progress=False)
    return root


def _prune(ckpt, *argv):
    from megatron_prune.__main__ import main

    return main(["prune", "--load", str(ckpt / "tp2"), "--save", str(ckpt / "out"), *argv])


def test_cli_dry_run_prints_the_table_and_writes_nothing(ckpt, capsys):
    """The space's maximal shapes, every one in the window the header names; the evaluated count is said."""
    rc = _prune(ckpt, "--target-params", "60%", "--width-multiple", "8", "--search-candidates", "3", "--dry-run")
    out = capsys.readouterr().out
    assert rc == 0 and not (ckpt / "out").exists()
    rows = [line.split() for line in out.splitlines() if re.match(r"\s*\d+\s+layers=", line)]
    lower = int(re.search(r"window (\d+)-100%", out).group(1)) / 100
    assert [r[0] for r in rows] == [str(i) for i in range(1, len(rows) + 1)] and len(rows) >= 3
    assert "% of budget" in out and f"{len(rows)} of them maximal" in out and "a run evaluates 3 of them" in out
    header = next(line for line in out.splitlines() if line.split()[:2] == ["rank", "shape"])
    assert "HF transformers loads" in out and not header.endswith(" HF")  # no HF column: all load
    src = LlamaShape(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=4,
                     kv_channels=16, vocab_size=512)
    budget = round(0.6 * src.num_params())
    for r in rows:
        sizes = dict(kv.split("=") for kv in r[1:5])
        heads, groups = map(int, sizes["heads"].split("/"))
        s = src.replace(num_layers=int(sizes["layers"]), hidden_size=int(sizes["hidden"]), num_attention_heads=heads,
                        num_query_groups=groups, ffn_hidden_size=int(sizes["ffn"]))
        assert int(r[5].replace(",", "")) == s.num_params() and lower * budget <= s.num_params() <= budget


def test_cli_limits_of_another_model(ckpt, capsys, tmp_path):
    """--limits-of: the drop limits measured from another model's sizes (an HF config here, a Megatron checkpoint
    read alike): of 8 layers, at most 4 may go, so the 4-layer --load keeps all of its layers."""
    from megatron_prune.prune.search_run import limits_reference

    config = json.loads((ckpt / "hf" / "config.json").read_text())
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 8}))
    assert limits_reference(ckpt / "hf") == limits_reference(ckpt / "tp2").replace(dtype=limits_reference(
        ckpt / "hf").dtype)
    layers = {}
    for name, extra in (("own", []), ("of", ["--limits-of", str(tmp_path / "ref")])):
        rc = _prune(ckpt, "--target-params", "60%", "--width-multiple", "8", "--dry-run", *extra)
        out = capsys.readouterr().out
        assert rc == 0, out
        layers[name] = {int(m) for m in re.findall(r"\d+\s+layers=(\d+)", out)}
    assert min(layers["own"]) < 4 and layers["of"] == {4}


def test_cli_megatron_only_shapes_adds_an_hf_column(ckpt, capsys):
    rc = _prune(ckpt, "--target-params", "60%", "--width-multiple", "4", "--dry-run", "--megatron-only-shapes")
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s*\d+\s+layers=", line)]
    header = next(line for line in out.splitlines() if line.split()[:2] == ["rank", "shape"])
    assert rc == 0 and "--megatron-only-shapes" in out and header.split()[-1] == "HF"
    for r in rows:
        hidden, heads = int(r[2].split("=")[1]), int(r[3].split("=")[1].split("/")[0])
        assert r[-1] == ("yes" if hidden % heads == 0 else "no")
    assert {r[-1] for r in rows} == {"yes", "no"}


@pytest.mark.parametrize("argv, message", [
    (["--target-params", "60%", "--prune-type", "global"], "drop --prune-type global"),
    (["--target-params", "60%", "--search-eval-samples", "0"], "--search-eval-samples must be >= 1"),
    (["--hidden-size-remain", "32", "--width-multiple", "0", "--check-only"], "--width-multiple must be a positive"),
    (["--target-params", "60%", "--width-multiple", "8", "--tp", "4", "--check-only"], "--tp 4, but .* tp=2"),
    (["--target-params", "60%", "--dry-run", "--hidden-size-remain", "32"], "do not also give sizes"),
    (["--dry-run", "--hidden-size-remain", "32"], "--dry-run goes with --target-params"),
    (["--target-params", "1000", "--dry-run"], r"tp2: no shape within 80-100% of 1,000 params at TP 2.*closest: "),
    (["--target-params", "lots", "--dry-run"], "expected a parameter count"),
    (["--hidden-size-remain", "32", "--limits-of", "x", "--check-only"], "--limits-of measures the drop limits"),
    (["--target-params", "60%", "--limits-of", "/nonexistent", "--dry-run"], "--limits-of /nonexistent: no such"),
])
def test_cli_budget_errors_are_one_line(ckpt, capsys, argv, message):
    rc = _prune(ckpt, *argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and re.search(message, err), err
    assert not (ckpt / "out").exists()


# ----------------------------------------------------------------------------- memory: weights + KV cache
def _cache_tensors(cache) -> list:
    """The key and value tensors of an HF cache object, across transformers versions."""
    if hasattr(cache, "layers"):                                   # transformers >= 4.56: one object per layer
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    if hasattr(cache, "key_cache"):                                # DynamicCache of older 4.x
        return [*cache.key_cache, *cache.value_cache]
    return [t for kv in cache for t in kv]                          # legacy tuples


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", "bfloat16"), ("fp32", "float32")])
@pytest.mark.parametrize("overrides", [
    dict(),                                                             # GQA 4/2, untied
    dict(num_attention_heads=8, num_key_value_heads=8, head_dim=8, tie_word_embeddings=True),  # MHA, tied
    dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24, num_hidden_layers=3),     # head_dim != h/heads
])
def test_inference_memory_matches_a_transformers_model_and_its_kv_cache(overrides, dtype, torch_dtype):
    """Weights: the bytes of the HF model's parameters; KV cache: the bytes of the cache a forward pass fills."""
    import torch
    from transformers import LlamaForCausalLM

    from megatron_prune.config.shape import inference_memory_bytes

    cfg = llama_config(**overrides)
    model = LlamaForCausalLM(cfg).to(getattr(torch, torch_dtype)).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights are one parameter
    batch, seq = 3, 11
    with torch.no_grad():
        out = model(torch.zeros(batch, seq, dtype=torch.long), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    kv = sum(t.numel() * t.element_size() for t in _cache_tensors(cache))
    shape = LlamaShape.from_hf_config(cfg.to_dict())
    assert inference_memory_bytes(shape, seq, batch, dtype) == weights + kv
    assert inference_memory_bytes(shape, 0, batch, dtype) == weights


def memory(s: LlamaShape, seq: int, batch: int = 1) -> int:
    """bf16 weights + KV cache, written out here: 2 bytes x (params + k and v x layers x groups x head dim x tokens)."""
    return 2 * (s.num_params() + 2 * s.num_layers * s.num_query_groups * s.kv_channels * seq * batch)


def test_parse_memory_and_the_kv_default():
    from megatron_prune.config.shape import GiB
    from megatron_prune.prune.budget import make_budget, parse_memory_gb

    assert GiB == 2**30 and parse_memory_gb("0.25") == 2**28 and parse_memory_gb(" 2 ") == 2**31
    for bad in ("abc", "0", "-1", "inf"):
        with pytest.raises(BudgetError, match="--target-memory-gb"):
            parse_memory_gb(bad)
    src = SMOL.replace(max_position_embeddings=8192)
    b = make_budget(src, target_memory_gb="0.2")
    assert (b.params, b.memory, b.seq_length, b.batch_size) == (None, round(0.2 * 2**30), 8192, 1)
    b = make_budget(src, "50%", "0.2", seq_length=512, batch_size=4)
    assert (b.params, b.seq_length, b.batch_size) == (round(SMOL.num_params() / 2), 512, 4)
    with pytest.raises(BudgetError, match="exceeds the source model's"):  # 135M bf16 weights are 0.25 GiB
        make_budget(src, target_memory_gb="0.5")
    with pytest.raises(BudgetError, match="--target-params and/or --target-memory-gb"):
        make_budget(src)
    with pytest.raises(BudgetError, match="--memory-seq-length"):
        make_budget(src, target_memory_gb="0.2", seq_length=0)


MEMORY_CASES = {  # name: (source, tp, limits, seq, batch, params fraction or None, memory fraction of the source's)
    "gqa-memory": (SOURCES["gqa-tp2"][0], 2, SearchLimits(8), 256, 2, None, 0.6),
    "mha-memory": (SOURCES["mha-tp2"][0], 2, SOURCES["mha-tp2"][3], 64, 1, None, 0.55),
    "smol-memory": (SMOL, 3, SearchLimits(32), 8192, 1, None, 0.5),
    "gqa-both": (SOURCES["gqa-tp2"][0], 2, SearchLimits(8, candidates=12), 256, 2, 0.6, 0.62),
    "smol-both": (SMOL, 3, SearchLimits(32), 2048, 4, 0.5, 0.55),
}


def _memory_budget(name):
    from megatron_prune.prune.budget import Budget

    src, tp, limits, seq, batch, pfrac, mfrac = MEMORY_CASES[name]
    params = int(src.num_params() * pfrac) if pfrac else None
    return src, tp, limits, Budget(params=params, memory=int(memory(src, seq, batch) * mfrac), seq_length=seq,
                                   batch_size=batch)


@pytest.mark.parametrize("name", list(MEMORY_CASES))
def test_memory_budget_space_matches_a_brute_force_enumeration(name):
    """Memory alone: the window is on the bytes (95-100%, widened as for parameters), ordered by bytes. With
    parameters: the window is on the parameters, the memory a ceiling (also for maximality)."""
    src, tp, limits, b = _memory_budget(name)
    rows = [(p, memory(s, b.seq_length, b.batch_size), s) for p, s in brute_force(src, tp, limits)]
    fits = {s: (b.params is None or p <= b.params) and m <= b.memory for p, m, s in rows}
    maximal = brute_maximal([(p, s) for p, _, s in rows], fits.get)
    target = b.params if b.params is not None else b.memory
    value = {s: (p if b.params is not None else m) for p, m, s in rows}
    for lower in (0.95, 0.90, 0.85, 0.80):
        inside = {s for s in maximal if value[s] >= math.ceil(lower * target)}
        if len(inside) >= limits.candidates or lower == 0.80:
            break
    valid = [s for s in fits if fits[s] and value[s] >= math.ceil(lower * target)]
    if b.params is not None:
        assert any(not fits[s] for s in fits if math.ceil(lower * target) <= value[s] <= b.params), \
            "the ceiling never binds"
    space = find_space(src, tp, b, limits)
    assert (space.lower, space.valid) == (lower, len(valid)) and {c.shape for c in space.shapes} == inside
    assert [target - (c.params if b.params is not None else c.memory) for c in space.shapes] == sorted(
        target - value[c.shape] for c in space.shapes)
    for c in space.shapes:
        assert c.memory == memory(c.shape, b.seq_length, b.batch_size) and c.params == c.shape.num_params()
        assert hand_validated(src, tp, c.shape) == c.shape


def test_memory_table_has_a_memory_column():
    from megatron_prune.prune.display import format_table

    src, tp, limits, b = _memory_budget("smol-both")
    space = find_space(src, tp, b, limits)
    table = format_table(space).splitlines()
    assert table[0].split() == ["rank", "shape", "params", "%", "of", "budget", "memory", "GiB", "%", "of", "memory",
                                "budget"]
    c = space.shapes[0]
    assert f"{c.memory / 2**30:.4f}" in table[1] and f"{100 * c.memory / b.memory:.2f}%" in table[1]


def test_unreachable_combined_budget_names_the_closest_shape_and_both_budgets():
    """95-100% of the parameters but a memory ceiling only much smaller shapes meet: nothing fits; the error names
    both budgets and the shape with the smallest relative distance (to the parameters + above the ceiling)."""
    from megatron_prune.prune.budget import Budget

    src, tp, _, limits = SOURCES["gqa-tp2"]
    seq, batch = 256, 2
    b = Budget(params=int(src.num_params() * 0.8), memory=int(memory(src, seq, batch) * 0.5), seq_length=seq,
               batch_size=batch)
    with pytest.raises(BudgetError) as e:
        find_space(src, tp, b, limits)
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert f"of {b.params:,} params and at most {b.memory / 2**30:.4g} GiB" in msg and "--target-memory-gb" in msg
    m = re.search(r"closest: layers=(\d+) hidden=(\d+) heads=(\d+)/(\d+) ffn=(\d+) with ([\d,]+) params "
                  r"\(([\d.]+)% of the parameter budget\) and [\d.]+ GiB \(([\d.]+)% of the memory budget\)", msg)
    assert m, msg
    layers, hidden, heads, groups, ffn = map(int, m.groups()[:5])
    named = src.replace(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                        ffn_hidden_size=ffn)
    mem = memory(named, seq, batch)
    assert named.num_params() == int(m.group(6).replace(",", "")) and hand_validated(src, tp, named) == named
    assert float(m.group(8)) == pytest.approx(100 * mem / b.memory, abs=0.01)

    def distance(p, mm):
        return abs(p - b.params) / b.params + max(0, mm - b.memory) / b.memory

    best = min(distance(p, memory(s, seq, batch)) for p, s in brute_force(src, tp, limits))
    assert distance(named.num_params(), mem) == pytest.approx(best, rel=1e-12)


# ----------------------------------------------------------------------------- hand-given widths
@pytest.mark.parametrize("argv, warned", [
    (["--hidden-size-remain", "48"], "hidden 48"),
    (["--hidden-size-remain", "48", "--ffn-hidden-size-remain", "40"], "hidden 48 and ffn 40"),
    (["--hidden-size-remain", "48", "--width-multiple", "16"], None),
    (["--hidden-size-remain", "48", "--ffn-hidden-size-remain", "40", "--width-multiple", "16"], "ffn 40"),
    (["--num-attention-heads-remain", "4"], None),  # head counts are not widths
])
def test_hand_given_width_off_the_multiple_warns_in_one_line(ckpt, capsys, argv, warned):
    rc = _prune(ckpt, *argv, "--check-only")
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith("ok: ") and not (ckpt / "out").exists()
    lines = [line for line in err.splitlines() if "--width-multiple" in line]
    if warned is None:
        assert not lines, err
        return
    assert len(lines) == 1 and lines[0].startswith(f"warning: {warned} not a multiple of --width-multiple "), err
    assert "W4A16" in lines[0] and "% 128 == 0" in lines[0]


# ----------------------------------------------------------------------------- CLI: memory budget, --check-only
TINY = LlamaShape(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=4,
                  kv_channels=16, vocab_size=512, max_position_embeddings=256)  # the `ckpt` fixture's model


def _rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if re.match(r"\s*\d+\s+layers=", line)]


def _shape_of(row: list[str]) -> LlamaShape:
    sizes = dict(kv.split("=") for kv in row[1:5])
    heads, groups = map(int, sizes["heads"].split("/"))
    return TINY.replace(num_layers=int(sizes["layers"]), hidden_size=int(sizes["hidden"]), num_attention_heads=heads,
                        num_query_groups=groups, ffn_hidden_size=int(sizes["ffn"]))


def test_cli_memory_dry_run_needs_no_save_and_defaults_to_the_full_context(ckpt, capsys):
    """Memory alone, KV cache at the model's max_position_embeddings (256) by default; no --save needed."""
    from megatron_prune.__main__ import main

    gib = 0.7 * memory(TINY, 256) / 2**30
    rc = main(["prune", "--load", str(ckpt / "tp2"), "--target-memory-gb", repr(gib), "--width-multiple", "8",
               "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "KV cache of 1 x 256 tokens" in out and "memory GiB" in out and "% of budget" not in out
    rows = _rows(out)
    assert rows
    budget, lower = round(gib * 2**30), int(re.search(r"window (\d+)-100%", out).group(1)) / 100
    for r in rows:
        m = memory(_shape_of(r), 256)
        assert lower * budget <= m <= budget and r[6] == f"{m / 2**30:.4f}" and r[5] == f"{_shape_of(r).num_params():,}"


def test_cli_combined_budget_with_seq_and_batch(ckpt, capsys):
    src_mem = memory(TINY, 64, 2)
    rc = _prune(ckpt, "--target-params", "60%", "--target-memory-gb", repr(0.58 * src_mem / 2**30),
                "--memory-seq-length", "64", "--memory-batch-size", "2", "--width-multiple", "8", "--dry-run")
    out = capsys.readouterr().out
    assert rc == 0 and "KV cache of 2 x 64 tokens" in out and "% of budget" in out and "memory GiB" in out
    budget, lower = round(0.6 * TINY.num_params()), int(re.search(r"window (\d+)-100%", out).group(1)) / 100
    for r in _rows(out):
        s = _shape_of(r)
        assert lower * budget <= s.num_params() <= budget and memory(s, 64, 2) <= round(0.58 * src_mem)


def test_activation_importance_is_the_default(ckpt):
    import argparse

    from megatron_prune.cli.prune import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--load", str(ckpt / "tp2"), "--save", str(ckpt / "out")]
    assert build_config(parser.parse_args(base + ["--target-params", "60%"])).importance == "activation"
    assert build_config(parser.parse_args(base + ["--hidden-size-remain", "32"])).importance == "activation"
    given = base + ["--target-params", "60%", "--importance", "magnitude", "--max-depth-drop", "0"]
    assert build_config(parser.parse_args(given)).importance == "magnitude"


def test_cli_check_only_validates_the_budget_and_counts_the_candidates(ckpt, capsys):
    rc = _prune(ckpt, "--target-params", "60%", "--width-multiple", "8", "--search-candidates", "3", "--check-only")
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("ok: ") and "a run evaluates 3 of them by loss" in out and not _rows(out)
    assert re.search(r"window \d+-100%.*: \d+ valid shapes HF transformers loads .*\d+ of them maximal", out), out
    assert not (ckpt / "out").exists()
    rc = _prune(ckpt, "--target-params", "1000", "--check-only")
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "closest: " in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--memory-seq-length", "64", "--hidden-size-remain", "32"], "give --target-memory-gb too"),
    (["--target-memory-gb", "lots", "--dry-run"], "--target-memory-gb 'lots': expected a size in GiB"),
    (["--target-memory-gb", "1", "--dry-run"], "exceeds the source model's"),
    (["--target-memory-gb", "1e-4", "--dry-run", "--ffn-hidden-size-remain", "32"], "do not also give sizes"),
])
def test_cli_memory_errors_are_one_line(ckpt, capsys, argv, message):
    rc = _prune(ckpt, *argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_cli_save_is_required_without_dry_run(ckpt, capsys):
    from megatron_prune.__main__ import main

    rc = main(["prune", "--load", str(ckpt / "tp2"), "--hidden-size-remain", "32", "--check-only"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "error: the following arguments are required: --save (see --help)", err


def test_pruning_run_warns_once_about_a_hand_given_width(ckpt):
    """The real run (one process at TP=1, as torchrun's rank 0 would) prints the width warning once, and prunes."""
    import os
    import subprocess
    import sys

    from megatron_prune.checkpoint.convert_files import hf_to_megatron

    hf_to_megatron(ckpt / "hf", ckpt / "tp1", tp=1, progress=False)
    res = subprocess.run([sys.executable, "-m", "megatron_prune", "prune", "--load", str(ckpt / "tp1"), "--save",
                          str(ckpt / "tp1-pruned"), "--ffn-hidden-size-remain", "40", "--importance", "random",
                          "--no-progress"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if "--width-multiple" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ffn 40 not a multiple of --width-multiple 128"), lines
    assert json.loads((ckpt / "tp1-pruned" / "megatron_prune.json").read_text())["shape"]["ffn_hidden_size"] == 40

