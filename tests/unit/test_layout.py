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


# ----------------------------------------------------------------------------- ownership and kept-unit indices
# References below build each rank's shard by hand (views per group / head, torch.chunk per rank) and select
# the kept units from those views; the layout functions must pick the same rows.
CASES = [  # (groups, heads per group, kv_channels, tp, kept groups, kept heads per kept group)
    (4, 3, 2, 2, (0, 3), ((0, 2), (1, 2))),
    (4, 3, 2, 2, (0, 1), ((1,), (0,))),          # both kept groups on rank 0: rank 1 keeps nothing
    (6, 2, 3, 3, (1, 2, 5), ((0, 1), (1,), (0,))),
    (2, 4, 2, 1, (1,), ((0, 1, 3),)),
]


def test_rank_range_and_local_indices_match_torch_chunk():
    for n, tp in ((12, 1), (12, 3), (8, 4)):
        kept = [0, 2, 3, 7, 8, 11][: 4 if n == 8 else 6]
        blocks = torch.arange(n).chunk(tp)
        for r in range(tp):
            assert list(layout.rank_range(n, tp, r)) == blocks[r].tolist()
            mine = [k for k in kept if k in blocks[r].tolist()]
            assert layout.local_indices(kept, n, tp, r) == [blocks[r].tolist().index(k) for k in mine]
        assert layout.kept_per_rank(kept, n, tp) == [sum(k in b.tolist() for k in kept) for b in blocks]
    with pytest.raises(ValueError, match="not divisible by TP 4"):
        layout.rank_range(10, 4, 0)


def test_vocab_keep_mask_matches_padded_rows():
    true_vocab, padded, tp = 13, 16, 2
    real = torch.arange(padded) < true_vocab
    for r, block in enumerate(real.chunk(tp)):
        assert torch.equal(layout.vocab_keep_mask(padded // tp, r, true_vocab), block)
    assert list(layout.block_range(8, 1)) == list(range(8, 16))


def _qkv(groups, hpg, d, hidden=5):
    return rand(groups * hpg * d, hidden), rand(groups * d, hidden) + 10, rand(groups * d, hidden) + 20


@pytest.mark.parametrize("groups, hpg, d, tp, kept, heads", CASES)
def test_qkv_shard_rows_pick_kept_heads_of_local_groups(groups, hpg, d, tp, kept, heads):
    q, k, v = _qkv(groups, hpg, d)
    qv, kv_, vv = q.view(groups, hpg, d, -1), k.view(groups, d, -1), v.view(groups, d, -1)
    per = groups // tp
    for r in range(tp):
        local = range(r * per, (r + 1) * per)
        shard = torch.cat([torch.cat([qv[g].reshape(hpg * d, -1), kv_[g], vv[g]]) for g in local])
        want = [torch.cat([*(qv[g, h] for h in hs), kv_[g], vv[g]]) for g, hs in zip(kept, heads) if g in local]
        rows = layout.qkv_shard_rows(kept, heads, hpg, d, groups, tp, r)
        got = shard[torch.as_tensor(rows, dtype=torch.long)]
        assert torch.equal(got, torch.cat(want) if want else shard[:0])


@pytest.mark.parametrize("groups, hpg, d, tp, kept, heads", CASES)
def test_proj_shard_cols_pick_kept_heads(groups, hpg, d, tp, kept, heads):
    o = rand(5, groups * hpg * d)
    ov = o.view(5, groups, hpg, d)
    per = groups // tp
    for r in range(tp):
        local = range(r * per, (r + 1) * per)
        shard = o.chunk(tp, dim=1)[r]
        want = [ov[:, g, h] for g, hs in zip(kept, heads) if g in local for h in hs]
        cols = layout.proj_shard_cols(kept, heads, hpg, d, groups, tp, r)
        got = shard[:, torch.as_tensor(cols, dtype=torch.long)]
        assert torch.equal(got, torch.cat(want, dim=1) if want else shard[:, :0])


@pytest.mark.parametrize("tp", TPS)
def test_fc1_shard_rows_pick_gate_then_up_of_kept_channels(tp):
    gate, up = rand(16, 4), rand(16, 4) + 10
    kept = [1, 2, 5, 9, 14, 15]
    for r in range(tp):
        shard = torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])
        mine = [f for f in kept if f in range(r * 16 // tp, (r + 1) * 16 // tp)]
        got = shard[torch.as_tensor(layout.fc1_shard_rows(kept, 16, tp, r), dtype=torch.long)]
        assert torch.equal(got, torch.cat([gate[mine], up[mine]]))


@pytest.mark.parametrize("groups, hpg, d, tp, kept, heads", CASES)
def test_hf_rows_match_per_head_views_and_pruned_shards_merge_to_them(groups, hpg, d, tp, kept, heads):
    q, k, v = _qkv(groups, hpg, d)
    qv, kv_ = q.view(groups, hpg, d, -1), k.view(groups, d, -1)
    hf_q = q[torch.as_tensor(layout.hf_head_rows(kept, heads, hpg, d), dtype=torch.long)]
    hf_k = k[torch.as_tensor(layout.hf_group_rows(kept, d), dtype=torch.long)]
    assert torch.equal(hf_q, torch.cat([qv[g, h] for g, hs in zip(kept, heads) for h in hs]))
    assert torch.equal(hf_k, torch.cat([kv_[g] for g in kept]))
    if len({len(h) for h in heads}) == 1:  # a pruned model has equal heads per group: shards merge back to HF
        shards = [layout.split_qkv(q, k, v, tp, r, groups, d) for r in range(tp)]
        pruned = [s[torch.as_tensor(layout.qkv_shard_rows(kept, heads, hpg, d, groups, tp, r), dtype=torch.long)]
                  for r, s in enumerate(shards)]
        mq, mk, _ = layout.merge_qkv(pruned, len(heads[0]), d)
        assert torch.equal(mq, hf_q) and torch.equal(mk, hf_k)
