"""Held-out loss / perplexity of a Megatron model (any TP/PP/DP) and of an HF model on the same windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_prune.model.forward import forward_batches, mean_loss, micro_batches


@dataclass(frozen=True)
class EvalResult:
    loss: float
    tokens: int
    windows: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 100 else float("inf")

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, "windows": self.windows}


def evaluate_megatron(model, windows: torch.Tensor, true_vocab: int, micro_batch_size: int = 4,
                      progress: bool = False) -> EvalResult:
    """Mean next-token loss over `windows`, split across data-parallel ranks; the result is known on every rank.
    `progress`: a progress bar over this rank's batches."""
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batches = micro_batches(windows[dp_rank::dp], micro_batch_size)
    model.eval()
    results = forward_batches(model, batches, true_vocab, progress=progress) if batches else []
    loss, tokens = mean_loss(results)
    return EvalResult(loss=loss, tokens=tokens, windows=len(windows))


def evaluate_hf(model, windows: torch.Tensor, micro_batch_size: int = 4) -> EvalResult:
    """The same quantity computed by an HF causal LM (the independent reference)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), micro_batch_size):
            batch = windows[i:i + micro_batch_size]
            logits = model(batch[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     batch[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += batch[:, 1:].numel()
    return EvalResult(loss=total / count, tokens=count, windows=len(windows))
