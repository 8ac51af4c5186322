"""Each layout kind: merge(split(x)) == x for every TP size, and split against an independent construction."""

import pytest
import torch

from megatron_prune.checkpoint import layout

TPS = [1, 2, 4]


def rand(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


@pytest.mark.parametrize("tp", TPS)
def test_column_row_replicated_round_trip(tp):
    x = rand(16, 8)
    assert torch.equal(layout.merge_column([layout.split_column(x, tp, r) for r in range(tp)]), x)
    assert torch.equal(layout.merge_row([layout.split_row(x.T, tp, r) for r in range(tp)]), x.T)
    assert torch.equal(layout.merge_replicated([layout.split_replicated(x, tp, r) for r in range(tp)]), x)


def test_replicated_merge_detects_divergent_ranks():
    x = rand(4)
    with pytest.raises(ValueError, match="differs between TP rank 0 and rank 1"):
        layout.merge_replicated([x, x + 1])


@pytest.mark.parametrize("tp", TPS)
def test_vocab_pads_with_zero_rows_and_unpads(tp):
    x = rand(1000, 8)
    padded = 1024
    shards = [layout.split_vocab(x, tp, r, padded) for r in range(tp)]
    assert all(s.shape == (padded // tp, 8) for s in shards)
    full = torch.cat(shards)
    assert torch.equal(full[:1000], x) and not full[1000:].any()
    assert torch.equal(layout.merge_vocab(shards, 1000), x)


@pytest.mark.parametrize("tp", [1, 2])
def test_qkv_per_group_layout(tp):
    groups, hpg, d, hidden = 2, 3, 4, 8
    q, k, v = rand(groups * hpg * d, hidden), rand(groups * d, hidden), rand(groups * d, hidden)
    shards = [layout.split_qkv(q, k, v, tp, r, groups, d) for r in range(tp)]
    # independent construction: rows of group g are [q heads of g; k_g; v_g], groups in order
    expected = torch.cat([torch.cat([q[g * hpg * d:(g + 1) * hpg * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]])
                          for g in range(groups)])
    assert torch.equal(torch.cat(shards), expected)
    mq, mk, mv = layout.merge_qkv(shards, hpg, d)
    assert torch.equal(mq, q) and torch.equal(mk, k) and torch.equal(mv, v)


def test_qkv_merge_accepts_uneven_shards():
    hpg, d, hidden = 2, 4, 8
    q, k, v = rand(3 * hpg * d, hidden), rand(3 * d, hidden), rand(3 * d, hidden)
    full = layout.split_qkv(q, k, v, 1, 0, 3, d)
    per_group = (hpg + 2) * d
    mq, mk, mv = layout.merge_qkv([full[:per_group], full[per_group:]], hpg, d)  # 1 group + 2 groups
    assert torch.equal(mq, q) and torch.equal(mk, k) and torch.equal(mv, v)


@pytest.mark.parametrize("tp", TPS)
def test_fc1_gate_up_per_rank(tp):
    gate, up = rand(16, 8), rand(16, 8) + 10
    shards = [layout.split_fc1(gate, up, tp, r) for r in range(tp)]
    n = 16 // tp
    for r, s in enumerate(shards):
        assert torch.equal(s[:n], gate[r * n:(r + 1) * n]) and torch.equal(s[n:], up[r * n:(r + 1) * n])
    mg, mu = layout.merge_fc1(shards)
    assert torch.equal(mg, gate) and torch.equal(mu, up)


def test_split_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match="rows 10 not divisible by TP 4"):
        layout.split_column(rand(10, 2), 4, 0)


def test_split_outputs_own_their_storage():
    x = rand(16, 8)
    s = layout.split_column(x, 2, 1)
    assert s.untyped_storage().nbytes() == s.numel() * s.element_size()
