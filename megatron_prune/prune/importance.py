"""Importance scores of a TP-sharded model, made global over the TP group so that a choice can be global.

activation (Minitron): forward hooks on the model during calibration passes, fp32 throughout.
  hidden channel: |post-norm activation| (input_layernorm and pre_mlp_layernorm outputs), mean over the sequence,
                  L2 over the batch (all calibration samples), summed over the 2 x layers norms.
  head:           per-head L2 norm (over kv_channels) of linear_proj's input, mean over sequence, L2 over batch.
  FFN channel:    |linear_fc2 input|, mean over sequence, L2 over batch.
  layer:          Block Influence = mean over tokens of 1 - cos(layer input, layer output).
magnitude (data-free): L2 norms of weights: embedding columns (hidden), linear_proj columns of a head (head),
  linear_fc2 columns (FFN channel). No layer scores.

Each rank scores its local heads / FFN channels; all-gather over TP concatenates them in rank order, which is
global order (checkpoint.layout: rank r owns contiguous block r of groups and FFN channels). Hidden and layer
scores are computed from replicated activations, identical on every rank; TP rank 0's copy is broadcast so the
choice cannot diverge.
Activations are megatron's [seq, batch, channels].
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_prune.checkpoint.keys import EMBEDDING, FC2, PROJ, to_local_names
from megatron_prune.config.shape import LlamaShape
from megatron_prune.prune.select import Scores


def _seq_mean_sq(x: torch.Tensor) -> torch.Tensor:
    """[s, b, c] -> [c]: mean over the sequence of |x|, squared and summed over the batch (sqrt taken at the end)."""
    return x.float().abs().mean(dim=0).pow(2).sum(dim=0)


# ----------------------------------------------------------------------------- collectives over the TP group
def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _comm_device(group) -> torch.device:
    nccl = dist.is_initialized() and dist.get_backend(group) == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def gather_dim1(t: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every TP rank's [a, n_local, ...] along dim 1, in rank order."""
    n = _world(group)
    if n == 1:
        return t.cpu()
    t = t.to(_comm_device(group)).contiguous()
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t, group=group)
    return torch.cat([p.cpu() for p in parts], dim=1)


def from_first_rank(t: torch.Tensor, group=None) -> torch.Tensor:
    if _world(group) == 1:
        return t.cpu()
    t = t.to(_comm_device(group)).contiguous()
    dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return t.cpu()


def sum_over_ranks(t: torch.Tensor, group=None) -> torch.Tensor:
    if _world(group) == 1:
        return t.cpu()
    t = t.to(_comm_device(group)).contiguous()
    dist.all_reduce(t, group=group)
    return t.cpu()


# ----------------------------------------------------------------------------- magnitude (data-free)
def magnitude_scores(sd: dict, shape: LlamaShape, group=None) -> Scores:
    """Weight-norm importance from this rank's shard (PP=1), made global over `group`."""
    sd = to_local_names(sd)
    d, hpg = shape.kv_channels, shape.heads_per_group
    emb_sq = sd[EMBEDDING.mcore].float().pow(2).sum(dim=0)  # vocab rows are split over TP: sum, then sqrt
    heads, ffn = [], []
    for i in range(shape.num_layers):
        proj = sd[PROJ.mcore.format(i)].float()
        per_head = proj.view(proj.shape[0], -1, d).pow(2).sum(dim=(0, 2)).sqrt()
        heads.append(per_head.view(-1, hpg))
        ffn.append(sd[FC2.mcore.format(i)].float().pow(2).sum(dim=0).sqrt())
    return Scores(hidden=sum_over_ranks(emb_sq, group).sqrt(), heads=gather_dim1(torch.stack(heads), group),
                  ffn=gather_dim1(torch.stack(ffn), group), layers=None)


# ----------------------------------------------------------------------------- activation (calibration passes)
class ActivationScorer:
    """Context manager: hooks on a megatron-core GPTModel (PP=1, local spec) that accumulate importance while
    the caller runs forward passes; `scores(group)` then returns the global Scores. The hooks detach what they
    keep, so passes run with autograd (Taylor importance) do not keep their graphs alive across batches."""

    def __init__(self, model, shape: LlamaShape, block_influence: bool = True):
        self.layers = list(model.decoder.layers)
        if len(self.layers) != shape.num_layers:
            raise ValueError(f"model has {len(self.layers)} layers, expected {shape.num_layers} (PP=1 only)")
        self.shape, self.block_influence = shape, block_influence
        self.hidden_sq: list[torch.Tensor | int] = [0] * (2 * len(self.layers))
        self.heads_sq: list[torch.Tensor | int] = [0] * len(self.layers)
        self.ffn_sq: list[torch.Tensor | int] = [0] * len(self.layers)
        self.bi_sum = torch.zeros(len(self.layers), dtype=torch.float64)
        self.tokens = 0
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "ActivationScorer":
        for i, layer in enumerate(self.layers):
            self._handles += [
                layer.input_layernorm.register_forward_hook(self._norm_hook(2 * i)),
                layer.pre_mlp_layernorm.register_forward_hook(self._norm_hook(2 * i + 1)),
                layer.self_attention.linear_proj.register_forward_pre_hook(self._proj_hook(i)),
                layer.mlp.linear_fc2.register_forward_pre_hook(self._fc2_hook(i)),
            ]
            if self.block_influence:
                self._handles += [layer.register_forward_pre_hook(self._layer_in(i), with_kwargs=True),
                                  layer.register_forward_hook(self._layer_out(i))]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _norm_hook(self, k: int):
        def hook(module, args, output):
            self.hidden_sq[k] = self.hidden_sq[k] + _seq_mean_sq(output.detach())
        return hook

    def _proj_hook(self, i: int):
        d = self.shape.kv_channels

        def hook(module, args):
            x = args[0].detach()
            per_head = x.float().view(*x.shape[:2], -1, d).norm(dim=-1)  # [s, b, local heads]
            self.heads_sq[i] = self.heads_sq[i] + _seq_mean_sq(per_head)
        return hook

    def _fc2_hook(self, i: int):
        def hook(module, args):
            self.ffn_sq[i] = self.ffn_sq[i] + _seq_mean_sq(args[0].detach())
        return hook

    def _layer_in(self, i: int):
        def hook(module, args, kwargs):
            self._inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    def _layer_out(self, i: int):
        def hook(module, args, output):
            x, y = self._inputs.pop(i), output[0] if isinstance(output, tuple) else output
            x, y = x.detach().float(), y.detach().float()
            # cosine per token; written out because F.cosine_similarity is ~3x slower on CPU
            cos = (x * y).sum(dim=-1) / (torch.linalg.vector_norm(x, dim=-1) *
                                         torch.linalg.vector_norm(y, dim=-1)).clamp_min(1e-12)  # [s, b]
            self.bi_sum[i] += (1.0 - cos).double().sum().cpu()
            if i == 0:
                self.tokens += cos.numel()
        return hook

    def scores(self, group=None) -> Scores:
        if self.tokens == 0 and self.block_influence or any(isinstance(h, int) for h in self.heads_sq):
            raise RuntimeError("no calibration forward pass was recorded")
        hidden = torch.stack([h.sqrt() for h in self.hidden_sq]).sum(dim=0)
        heads = torch.stack([h.sqrt() for h in self.heads_sq]).view(len(self.layers), -1,
                                                                    self.shape.heads_per_group)
        ffn = torch.stack([f.sqrt() for f in self.ffn_sq])
        layers = (self.bi_sum / self.tokens).float() if self.block_influence else None
        return Scores(hidden=from_first_rank(hidden, group), heads=gather_dim1(heads, group),
                      ffn=gather_dim1(ffn, group),
                      layers=from_first_rank(layers, group) if layers is not None else None)
