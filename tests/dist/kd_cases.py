"""Run on every rank by tests/dist/test_kd_logits.py (one torchrun launch for all cases).

Each case {name, student, teacher, tp, dtype, tokens [b, s+1], temperature, alpha, grads}: the logits that
forward_batches(keep_logits=True) returns, and one micro-batch through the training loop's own forward step and
loss function (train.loop._forward_step) with a teacher: its LM and KD sums, the loss sum's gradient on a few
parameters (this rank's shard), and the micro-batch's logits read again after the loss (must be untouched).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

GRAD_KEYS = ("output_layer.weight", "decoder.final_layernorm.weight", "decoder.layers.0.mlp.linear_fc2.weight")


def _loss_step(case: dict, info, student, teacher, meta) -> dict:
    """One micro-batch through train.loop._forward_step with a teacher (PP = 1), as train_step runs it."""
    from megatron_prune.train import loop

    tokens = torch.tensor(case["tokens"])
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    batch = {"tokens": inputs, "labels": labels, "loss_mask": torch.ones(labels.shape),
             "position_ids": torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs).contiguous()}
    session = SimpleNamespace(teacher=teacher, info=info, true_vocab=meta.shape.vocab_size,
                              cfg=SimpleNamespace(kd_alpha=case["alpha"], kd_temperature=case["temperature"]))
    output, loss_func = loop._forward_step(session, None, iter([batch]), student)
    before = output.detach().clone()
    total, _, report = loss_func(output)
    student.zero_grad(set_to_none=True)
    total.backward()
    params = dict(student.named_parameters())
    sums = report["sums"].tolist()  # [student LM, KD, (teacher LM: evaluation only,) tokens]
    lm_sum, kd_sum, n = sums[0], sums[1], sums[-1]
    return {"lm_sum": lm_sum, "kd_sum": kd_sum, "tokens": n, "total": float(total),
            "logits_changed": float((output.detach() - before).abs().max()),
            "grads": {k: params[k].grad.clone() for k in GRAD_KEYS} if case["grads"] else None}


def kd(payload: dict) -> dict:
    from megatron_prune.model.dist import init_model_parallel
    from megatron_prune.model.forward import forward_batches
    from megatron_prune.model.load import load_model

    out = {}
    for case in payload["cases"]:
        info = init_model_parallel(case["tp"], 1)
        student, meta = load_model(case["student"], info, dtype=case["dtype"])
        teacher, _ = load_model(case["teacher"], info, dtype=case["dtype"])
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student.eval()
        logits = forward_batches(student, [torch.tensor(case["tokens"])], meta.shape.vocab_size, keep_logits=True)
        student.train()
        out[case["name"]] = {"logits": logits[0]["logits"].float(), "tp_rank": info.tp_rank,
                             **_loss_step(case, info, student, teacher, meta)}
    return out
