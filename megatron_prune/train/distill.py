"""Knowledge distillation on vocab-parallel logits: KL(teacher || student) without gathering the vocabulary.

Each TP rank holds logits for a slice of the (padded) vocabulary. The softmax normaliser of every token is
assembled with two all-reduces (max, then sum of exponentials) and the per-token KL with a third, as
megatron-core's vocab-parallel cross entropy does. Padded vocabulary columns (global index >= true vocab)
are set to -inf in both teacher and student before the softmax, so they carry no probability.

With temperature T the loss is T^2 * KL(softmax(t/T) || softmax(s/T)) (Hinton et al.: the T^2 keeps gradient
magnitudes comparable across temperatures). Its gradient w.r.t. the student logits is T * (p_s - p_t),
computed locally in backward with no communication. The teacher receives no gradient.

With pipeline parallelism the teacher has its own pipeline stages: its logits for all micro-batches of a global
batch are computed first with a forward-only schedule (held on the last stage: micro-batches x mbs x seq x
vocab/tp values), then consumed in order by the student's loss. With PP=1 the teacher runs inside the
student's forward step instead (one micro-batch of teacher logits alive at a time).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron_prune.errors import InputError

from megatron_prune.checkpoint.layout import vocab_keep_mask  # noqa: F401  (the padded-vocab rule; re-exported)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _log_softmax_parallel(logits: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Log-softmax over the full (sharded) last dimension for several tensors, one all-reduce per statistic."""
    maxes = torch.stack([x.max(dim=-1).values for x in logits])
    _all_reduce(maxes, dist.ReduceOp.MAX, group)
    shifted = [x - m.unsqueeze(-1) for x, m in zip(logits, maxes)]
    sums = torch.stack([s.exp().sum(dim=-1) for s in shifted])
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    return [s - lse.log().unsqueeze(-1) for s, lse in zip(shifted, sums)]


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor, temperature: float,
                group) -> torch.Tensor:
        neg_inf = torch.tensor(float("-inf"), dtype=torch.float32, device=student.device)
        s = torch.where(keep, student.float() / temperature, neg_inf)
        t = torch.where(keep, teacher.float() / temperature, neg_inf)
        log_ps, log_pt = _log_softmax_parallel([s, t], group)
        p_t = log_pt.exp()
        # where(): masked columns have p_t = 0 and log p = -inf, whose product would be nan.
        kl = torch.where(keep, p_t * (log_pt - log_ps), torch.zeros((), device=s.device)).sum(dim=-1)
        _all_reduce(kl, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(log_ps.exp(), p_t)
        ctx.temperature = temperature
        return kl * temperature ** 2

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        p_s, p_t = ctx.saved_tensors
        grad = (p_s - p_t) * (ctx.temperature * grad_kl.unsqueeze(-1))
        return grad, None, None, None, None


def kd_token_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, true_vocab: int,
                    temperature: float = 1.0, tp_group=None, tp_rank: int | None = None) -> torch.Tensor:
    """Per-token T^2 * KL(teacher || student) [b, s] from vocab-parallel logits [b, s, v/tp] (fp32 math).

    Without `tp_rank`, the TP group and rank are megatron-core's for this process; with `tp_rank` given, the
    logits are this rank's slice and `tp_group` the group to reduce over (None: a single rank)."""
    if student_logits.shape != teacher_logits.shape:
        raise InputError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ (same vocabulary and TP size required)")
    if tp_rank is None:
        from megatron.core import parallel_state as ps

        tp_group, tp_rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    keep = vocab_keep_mask(student_logits.shape[-1], tp_rank, true_vocab, student_logits.device)
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), keep, float(temperature), tp_group)


def load_teacher(root: str, info, dtype: str, seq_length: int):
    """The frozen teacher for this rank (same TP/PP as the student; its shape may differ), in eval mode."""
    from megatron_prune.model.load import load_model

    model, meta = load_model(root, info, dtype=dtype, seq_length=seq_length)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta


def teacher_logits_pipelined(teacher, batches: list[dict], seq_length: int, micro_batch_size: int) -> list:
    """Teacher logits [mbs, s, v/tp] per micro-batch on the last pipeline stage ([] on other stages), from a
    forward-only pipeline schedule of the teacher over the same micro-batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prune.model.forward import causal_mask

    def step(data_iter, model):
        b = next(data_iter)
        out = model(b["tokens"], b["position_ids"], causal_mask(b["tokens"].shape[1], b["tokens"].device))
        return out, lambda logits, non_loss_data=True: logits.detach()

    with torch.no_grad():
        return list(get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(batches), model=[teacher], num_microbatches=len(batches),
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True,
            collect_non_loss_data=True))
