"""Vocab-parallel KL on a single rank against a full-vocabulary reference written here with torch.log_softmax
(the TP=2 comparison is in tests/dist/test_train_dist.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_prune.train.distill import kd_token_losses, vocab_keep_mask


def _reference(student: torch.Tensor, teacher: torch.Tensor, vocab: int, temperature: float) -> torch.Tensor:
    log_ps = torch.log_softmax(student[..., :vocab].double() / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher[..., :vocab].double() / temperature, dim=-1)
    return torch.nn.functional.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1) * temperature ** 2


def _logits(seed: int, shape=(3, 7, 40)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 4, torch.randn(shape, generator=g) * 4


@pytest.mark.parametrize("vocab,temperature", [(40, 1.0), (33, 1.0), (33, 2.5), (40, 0.5)])
def test_loss_and_gradient_match_reference(vocab, temperature):
    s, t = _logits(vocab)
    s.requires_grad_(True)
    up = torch.rand(s.shape[:2], generator=torch.Generator().manual_seed(3))
    got = kd_token_losses(s, t, vocab, temperature, tp_group=None, tp_rank=0)
    (got * up).sum().backward()
    grad = s.grad.clone()
    s.grad = None
    ref = _reference(s, t, vocab, temperature)
    (ref * up.double()).sum().backward()
    assert torch.allclose(got.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    assert torch.allclose(grad, s.grad, atol=1e-6)
    assert torch.all(grad[..., vocab:] == 0)  # padded columns carry no probability and no gradient


def test_identical_logits_give_zero():
    s, _ = _logits(1)
    s[..., 35:] = 1e4  # huge padded logits must not matter
    loss = kd_token_losses(s, s.clone(), 35, 2.0, tp_group=None, tp_rank=0)
    assert loss.abs().max().item() <= 1e-6


def test_teacher_receives_no_gradient():
    s, t = _logits(2)
    s.requires_grad_(True)
    t.requires_grad_(True)
    kd_token_losses(s, t, 40, 1.0, tp_group=None, tp_rank=0).sum().backward()
    assert t.grad is None and s.grad is not None


def test_shape_mismatch_is_an_error():
    s, t = _logits(4)
    with pytest.raises(ValueError, match="differ"):
        kd_token_losses(s, t[..., :20], 40, tp_group=None, tp_rank=0)


def test_keep_mask_per_rank():
    assert vocab_keep_mask(8, 0, 13).tolist() == [True] * 8
    assert vocab_keep_mask(8, 1, 13).tolist() == [True] * 5 + [False] * 3
    assert not vocab_keep_mask(8, 2, 13).any()
