"""Forward passes of a (TP/PP) GPTModel through megatron-core's pipeline schedules, and a loss that is exact
on the true vocabulary: padded vocab columns are masked out of the softmax, so losses equal HF's."""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_prune.checkpoint import layout


def causal_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """megatron's convention: True = masked out. Passed explicitly (megatron's default builds it on CUDA)."""
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)


class ModelInputs(NamedTuple):
    """What a GPTModel forward takes for a batch of token windows, and the labels its loss needs."""
    inputs: torch.Tensor        # [b, s]: the window without its last token
    labels: torch.Tensor        # [b, s]: the next tokens (the window without its first)
    position_ids: torch.Tensor  # [b, s]
    mask: torch.Tensor          # [1, 1, s, s] causal_mask


def model_inputs(windows: torch.Tensor, device: torch.device | str | None = None) -> ModelInputs:
    """[b, s + 1] token windows -> ModelInputs on `device` (default: the windows' own)."""
    tokens = windows if device is None else windows.to(device)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    pos = torch.arange(inputs.shape[1], device=tokens.device).unsqueeze(0).expand_as(inputs)
    return ModelInputs(inputs, labels, pos, causal_mask(inputs.shape[1], tokens.device))


def micro_batches(windows: torch.Tensor, micro_batch_size: int) -> list[torch.Tensor]:
    """Consecutive [<= micro_batch_size, s + 1] slices of the windows, in order."""
    return [windows[i:i + micro_batch_size] for i in range(0, len(windows), micro_batch_size)]


def mask_padded_vocab_(logits: torch.Tensor, true_vocab: int) -> torch.Tensor:
    """Set logits of padded vocab entries (global index >= true_vocab) to the dtype's minimum on this TP rank,
    in place: pass a tensor you own (token_losses passes its private copy)."""
    from megatron.core import parallel_state as ps

    v_local, rank = logits.shape[-1], ps.get_tensor_model_parallel_rank()
    if layout.block_range(v_local, rank).stop <= true_vocab:
        return logits
    keep = layout.vocab_keep_mask(v_local, rank, true_vocab, logits.device)
    return logits.masked_fill_(~keep, torch.finfo(logits.dtype).min)


def token_losses(logits: torch.Tensor, labels: torch.Tensor, true_vocab: int) -> torch.Tensor:
    """Per-token cross entropy [b, s] from vocab-parallel logits [b, s, v/tp], in fp32. `logits` is left as it
    was: callers read it again (distillation, forward_batches' keep_logits)."""
    from megatron.core import tensor_parallel

    # megatron-core's vocab_parallel_cross_entropy overwrites its input (-= max, exp(out=), div_) to save memory.
    # Hand it a private fp32 [s, b, v/tp] copy, always made here: .float(), .transpose().contiguous() and the
    # padding mask are each a no-op (the caller's own storage) for fp32 logits at micro-batch 1 on a rank
    # without padded columns (issue 21). One copy in every case, the same count bf16 / micro-batch > 1 made.
    private = logits.transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    private = mask_padded_vocab_(private, true_vocab)
    return tensor_parallel.vocab_parallel_cross_entropy(private, labels.transpose(0, 1).contiguous()).transpose(0, 1)


def gather_vocab(logits: torch.Tensor, true_vocab: int) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V] (all TP ranks) without the padding: for tests and small evals."""
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)[..., :true_vocab]


def forward_batches(model, batches: Iterable[torch.Tensor], true_vocab: int, keep_logits: bool = False,
                    progress: bool = False) -> list[dict]:
    """Run each [b, s+1] token batch (inputs = [:, :-1], labels = [:, 1:]) through the model, forward only.

    Returns, on the last pipeline stage, one dict per batch: loss_sum, tokens (and full logits if asked);
    an empty list on other stages. `progress`: a progress bar over the batches (on the ranks that ask)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = list(batches)
    if not batches:
        return []
    b, s1 = batches[0].shape
    device = next(model.parameters()).device

    def step(data_iter: Iterator, model_):
        inputs, labels, pos, mask = model_inputs(next(data_iter), device)
        out = model_(inputs, pos, mask)

        def loss_func(logits):
            losses = token_losses(logits, labels, true_vocab)
            res = {"loss_sum": losses.sum().detach(), "tokens": labels.numel()}
            if keep_logits:
                res["logits"] = gather_vocab(logits.detach(), true_vocab)
            return losses.mean(), res

        return out, loss_func

    bar = tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            return list(get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter(bar), model=model, num_microbatches=len(batches),
                seq_length=s1 - 1, micro_batch_size=b, forward_only=True))
    finally:
        bar.close()


def mean_loss(results: list[dict], dp_group=None, src_last_stage: bool = True) -> tuple[float, int]:
    """(mean loss, tokens) over all batches of all data-parallel ranks, known on every rank."""
    from megatron.core import parallel_state as ps

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # NCCL reduces only CUDA tensors
    for r in results:
        totals += torch.tensor([float(r["loss_sum"]), float(r["tokens"])], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(totals, group=dp_group or ps.get_data_parallel_group())
        if src_last_stage and ps.get_pipeline_model_parallel_world_size() > 1:
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(totals, src=last, group=ps.get_pipeline_model_parallel_group())
    loss_sum, tokens = totals.tolist()
    return loss_sum / max(tokens, 1.0), int(tokens)
