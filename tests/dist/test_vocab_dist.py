"""Vocab-pruned Megatron checkpoints in megatron-core: on text made only of kept tokens, the pruned model's logits
equal the original's restricted to the kept ids, at TP=1, TP=2 (re-padded vocab) and tied PP=2 (one launch)."""

from __future__ import annotations

import pytest
import torch

from megatron_prune.checkpoint.convert_files import hf_to_megatron
from megatron_prune.data.tokenizers import load_tokenizer
from megatron_prune.testing import run_distributed
from megatron_prune.vocab.run import prune_vocab
from tests.helpers import make_hf_model
from tests.unit.test_vocab import kept_only_text, make_counts, train_spm

pytestmark = pytest.mark.dist
LAYOUTS = {"tp1": (1, 1, False), "tp2": (2, 1, False), "tied-pp2": (1, 2, True)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_dist")
    tok = train_spm(root / "tokenizer.model")
    counts = make_counts(tok, root / "counts.json")
    for tied in (False, True):
        make_hf_model(root / f"hf-{tied}", seed=5, vocab_size=1000, tie_word_embeddings=tied)
    cases, vmaps = [], {}
    for name, (tp, pp, tied) in LAYOUTS.items():
        hf_to_megatron(root / f"hf-{tied}", root / name, tp=tp, pp=pp, progress=False)
        vmaps[name] = prune_vocab(counts, 300, tok, root / f"{name}-pruned", load=root / name, progress=False).vmap
    vmap = vmaps["tp1"]
    assert all(v == vmap for v in vmaps.values())
    text, _ = kept_only_text(load_tokenizer(tok), set(vmap.kept), byte_level=False)
    old = torch.tensor(load_tokenizer(tok).encode(text)[:66]).view(2, 33)
    new = torch.tensor(vmap.map_ids(old.flatten().tolist())).view(2, 33)
    for name, (tp, pp, _) in LAYOUTS.items():
        cases.append({"name": name, "ckpt": str(root / name), "tp": tp, "pp": pp, "tokens": old.tolist()})
        cases.append({"name": f"{name}-pruned", "ckpt": str(root / f"{name}-pruned"), "tp": tp, "pp": pp,
                      "tokens": new.tolist()})
    got = {}
    for rank in run_distributed(2, "tests.dist.cases:logits", {"cases": cases}):
        got.update({name: r["logits"] for name, r in rank.items() if r["logits"] is not None})
    return vmap, got


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pruned_logits_equal_original_restricted(results, layout):
    vmap, got = results
    ref = got[layout if layout == "tied-pp2" else "tp1"][..., vmap.index()]
    pruned = got[f"{layout}-pruned"]
    assert pruned.shape == ref.shape == (2, 32, vmap.new_size)
    diff = (pruned - ref).abs().max().item()
    print(f"{layout}: vocab {vmap.old_size} -> {vmap.new_size}, max |logit diff| = {diff:.3g}")
    assert diff <= 1e-5
