"""Recovery training on megatron-core: GPTModel in DDP (optionally the distributed optimizer), pipeline
schedules from get_forward_backward_func, OptimizerParamScheduler, a non-finite-step guard, evaluation,
checkpoints and metrics.

Losses are per-token means over the whole global batch (megatron-core's `calculate_per_token_loss`: the
schedule sums token losses, finalize_model_grads divides the gradients by the global token count), so the
loss and the update do not depend on how the batch is split over DP ranks and micro-batches.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator, TextIO

import torch
import torch.distributed as dist

from megatron_prune.errors import UserError
from megatron_prune.checkpoint import megatron_io as mio
from megatron_prune.train import checkpointing as ckpt
from megatron_prune.train.config import ConfigError, TrainConfig
from megatron_prune.train.data import BatchPlan, DataSplits, build_datasets, check_data_paths, micro_batches
from megatron_prune.train.metrics import IntervalStats, MetricsWriter, default_peak_tflops, train_flops_per_token


class TrainingAborted(UserError, RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient. The losses and the gradient norm are global,
    so every rank raises it at the same step: reported once, by rank 0 (exit 2, cli.dist_entry)."""

    on_every_rank = True


@dataclass
class Session:
    """Everything one rank needs to run steps (built by `setup`)."""

    cfg: TrainConfig
    info: Any                      # DistInfo
    model: Any                     # DDP-wrapped GPTModel (this rank's stage)
    optimizer: Any
    scheduler: Any
    meta: mio.CheckpointMeta       # of the model being trained (training dtype)
    plan: BatchPlan
    data: DataSplits
    progress: ckpt.Progress
    teacher: Any = None
    teacher_meta: mio.CheckpointMeta | None = None
    bad_steps: int = 0
    tokenizer_src: Path | None = None

    @property
    def true_vocab(self) -> int:
        return self.meta.shape.vocab_size


@dataclass
class StepResult:
    lm_loss: float
    kd_loss: float | None
    tokens: int
    grad_norm: float | None
    lr: float
    skipped: str | None = None     # None, "overflow" (fp16 loss scale) or "non-finite"
    loss_scale: float | None = None


# ---------------------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig) -> Session:
    """Every rank validates what it will read before the first collective (`agree`): inputs, then its own
    rank file and optimizer shard; a failure on any rank is known to all, and reported once."""
    from megatron_prune.model.agree import agree
    from megatron_prune.model.dist import init_model_parallel, init_process_group

    init_process_group()
    point, tokenizer, tok_src, resume = agree(_check_inputs, cfg)
    info = init_model_parallel(cfg.tp, cfg.pp, cfg.seed)
    layout = cfg.layout(info.world_size)
    model, state, meta = agree(_load_student, cfg, point, info, resume)
    model = _wrap_ddp(cfg, model)
    optimizer = _build_optimizer(cfg, model)
    scheduler = _build_scheduler(cfg, optimizer)
    progress = _restore(cfg, point, state, optimizer, scheduler, info, model) if resume else ckpt.Progress()
    del state
    teacher, teacher_meta = agree(_build_teacher, cfg, info, meta)
    data = build_datasets(cfg, tokenizer)
    plan = BatchPlan(cfg.global_batch_size, cfg.micro_batch_size, layout.dp, info.dp_rank)
    return Session(cfg=cfg, info=info, model=model, optimizer=optimizer, scheduler=scheduler, meta=meta,
                   plan=plan, data=data, progress=progress, teacher=teacher, teacher_meta=teacher_meta,
                   tokenizer_src=tok_src if tok_src.is_dir() else None)


def _check_inputs(cfg: TrainConfig):
    """What every rank reads alike: data paths, the checkpoint to start from, its parallel sizes, the tokenizer.
    Returns (resume point, tokenizer, tokenizer source, whether optimizer state is resumed)."""
    from types import SimpleNamespace

    from megatron_prune.data.tokenizers import load_tokenizer
    from megatron_prune.model.load import check_loadable

    check_data_paths(cfg)
    point = ckpt.find_resume_point(cfg.load, cfg.save, cfg.tp, cfg.pp)
    world = dist.get_world_size()
    cfg.layout(world)
    check_loadable(point.meta, SimpleNamespace(tp=cfg.tp, pp=cfg.pp, world_size=world), point.root)
    tok_src = Path(cfg.tokenizer or cfg.load)
    tokenizer = load_tokenizer(tok_src)
    if tokenizer.vocab_size > point.meta.shape.vocab_size:
        raise ConfigError(f"tokenizer {tok_src} has {tokenizer.vocab_size} tokens, the model only "
                          f"{point.meta.shape.vocab_size} (pass the model's own tokenizer with --tokenizer)")
    # --finetune applies to --load only: a restart that finds this run's own checkpoint in --save resumes it
    from_load = point.root.resolve() == Path(cfg.load).resolve()
    resume = point.is_training_checkpoint and not (cfg.finetune and from_load)
    return point, tokenizer, tok_src, resume


def _load_student(cfg: TrainConfig, point: ckpt.ResumePoint, info, resume: bool):
    """This rank's model with its shard loaded (and, when resuming, its optimizer files checked): local work
    only, so a bad file on one rank is reported before any collective."""
    from megatron_prune.model.build import build_model, load_shard
    from megatron_prune.model.load import model_options

    meta = point.meta.replace(shape=point.meta.shape.replace(dtype=cfg.dtype))
    history = tuple(h for h in meta.history if h.get("op") != "train")  # keep the latest train entry only
    # te_names: the saved model keys are those of the layers built here (our loaders accept either spelling)
    meta = meta.replace(history=history, te_names=cfg.use_te)
    model = build_model(meta.shape, model_options(meta, dtype=cfg.dtype, seq_length=cfg.seq_length,
                                                  sequence_parallel=cfg.sequence_parallel, use_te=cfg.use_te))
    state = ckpt.load_rank_state(point, info)
    load_shard(model, state["model"], use_te=cfg.use_te)
    if resume:
        ckpt.check_optimizer_files(point, state, info, cfg.use_distributed_optimizer)
    return model, state, meta


def _wrap_ddp(cfg: TrainConfig, model):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    config = model.config
    config.calculate_per_token_loss = True          # read by DDP at construction: set before wrapping
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=cfg.use_distributed_optimizer)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    config.finalize_model_grads_func = finalize_model_grads
    return model


def _build_optimizer(cfg: TrainConfig, model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_prune.train.cpu_compat import cuda_type_names

    opt_config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad,
        bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16", params_dtype=getattr(torch, cfg.dtype),
        loss_scale=cfg.loss_scale, initial_loss_scale=cfg.initial_loss_scale, min_loss_scale=cfg.min_loss_scale,
        loss_scale_window=cfg.loss_scale_window, hysteresis=cfg.hysteresis,
        use_distributed_optimizer=cfg.use_distributed_optimizer)
    with cuda_type_names():
        optimizer = get_megatron_optimizer(opt_config, [model])
    model.config.grad_scale_func = optimizer.scale_loss  # fp16 loss scaling inside the schedules
    return optimizer


def _build_scheduler(cfg: TrainConfig, optimizer):
    """Megatron-LM counts scheduler steps in samples: one iteration = global_batch_size steps. On resume the
    checkpoint gives the step count, this run's settings give the schedule (override): a run extended with a
    larger --train-iters decays to its new end instead of training on at the old schedule's final rate."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = cfg.global_batch_size
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=cfg.lr_warmup_iters * gbs,
        lr_decay_steps=cfg.decay_iters * gbs, lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay, wd_incr_steps=cfg.decay_iters * gbs, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


# (scheduler attribute, what the user calls it, steps per unit: iterations are global_batch_size steps)
_SCHEDULE = (("max_lr", "lr", None), ("min_lr", "min-lr", None), ("lr_warmup_steps", "warm-up iterations", "gbs"),
             ("lr_decay_steps", "decay iterations", "gbs"), ("lr_decay_style", "decay style", None),
             ("start_wd", "weight decay", None))


def _restore(cfg: TrainConfig, point, state: dict, optimizer, scheduler, info, model) -> ckpt.Progress:
    """Resume the optimizer, RNG, data position and step count; the schedule is this run's, and rank 0 says so in
    one line when it differs from the checkpoint's (e.g. --train-iters 12 -> 16)."""
    progress = ckpt.restore_training_state(point, state, optimizer, scheduler, info, model)
    changes = schedule_changes(state["opt_param_scheduler"], scheduler, cfg.global_batch_size)
    if changes and info.rank == 0:
        print(f"resuming iteration {progress.iteration} with this run's learning-rate schedule, not the "
              f"checkpoint's: {', '.join(changes)}", flush=True)
    return progress


def schedule_changes(saved: dict, scheduler, gbs: int) -> list[str]:
    """`NAME OLD -> NEW` for every schedule setting of this run that differs from the saved scheduler state."""
    changes = []
    for key, name, unit in _SCHEDULE:
        old, new = saved.get(key), getattr(scheduler, key)
        if old is None or old == new:
            continue
        if unit == "gbs":
            old, new = f"{old / gbs:g}", f"{new / gbs:g}"
        changes.append(f"{name} {old} -> {new}")
    return changes


def _build_teacher(cfg: TrainConfig, info, meta: mio.CheckpointMeta):
    if not cfg.teacher_load:
        return None, None
    from megatron_prune.train.distill import load_teacher

    teacher, tmeta = load_teacher(cfg.teacher_load, info, cfg.dtype, cfg.seq_length)
    if (tmeta.shape.vocab_size, tmeta.padded_vocab_size) != (meta.shape.vocab_size, meta.padded_vocab_size):
        raise ConfigError(f"teacher vocab {tmeta.shape.vocab_size} (padded {tmeta.padded_vocab_size}) differs "
                          f"from the student's {meta.shape.vocab_size} (padded {meta.padded_vocab_size})")
    return teacher, tmeta


# ---------------------------------------------------------------------------------------------- steps
def _forward_step(session: Session, teacher_queue: deque | None, data_iter: Iterator, model,
                  teacher_lm: bool = False):
    """One micro-batch: the student's output and its loss function. Reported sums: [student LM, KD, teacher LM
    (when `teacher_lm`: evaluation), tokens]."""
    from megatron_prune.model.forward import causal_mask, token_losses
    from megatron_prune.train.distill import kd_token_losses

    batch = next(data_iter)
    tokens, pos = batch["tokens"], batch["position_ids"]
    mask = causal_mask(tokens.shape[1], tokens.device)
    output = model(tokens, pos, mask)
    teacher_logits = None
    if session.teacher is not None and session.info.is_last_stage:
        if teacher_queue is not None:  # PP > 1: computed before the step, in micro-batch order
            teacher_logits = teacher_queue.popleft()
        else:  # PP = 1: the teacher runs beside the student, one micro-batch of logits alive at a time
            with torch.no_grad():
                teacher_logits = session.teacher(tokens, pos, mask)
    cfg = session.cfg

    def loss_func(logits: torch.Tensor):
        # token_losses leaves `logits` as it was (it gives the in-place cross entropy its own copy), so the KD
        # term below reads the student's logits, not the softmax megatron-core writes (issue 21).
        loss_mask = batch["loss_mask"].float()
        lm = token_losses(logits, batch["labels"], session.true_vocab) * loss_mask
        total, kd_sum, teacher_sum = lm.sum(), torch.zeros(()), torch.zeros(())
        if teacher_logits is not None:
            kd = kd_token_losses(logits, teacher_logits, session.true_vocab, cfg.kd_temperature) * loss_mask
            total = cfg.kd_alpha * kd.sum() + (1.0 - cfg.kd_alpha) * lm.sum()
            kd_sum = kd.sum().detach()
            if teacher_lm:
                teacher_sum = (token_losses(teacher_logits, batch["labels"], session.true_vocab) * loss_mask).sum()
        n = loss_mask.sum()
        report = torch.stack([lm.sum().detach(), kd_sum, teacher_sum, n]).double()
        return total, n.to(torch.int), {"sums": report}

    return output, loss_func


def _reduce_sums(session: Session, results: list[dict]) -> torch.Tensor:
    """[lm_sum, kd_sum, teacher_lm_sum, tokens] of the global batch, known on every rank (one all-reduce over
    the world)."""
    sums = torch.zeros(4, dtype=torch.float64)
    if session.info.is_last_stage and session.info.tp_rank == 0:
        for r in results:
            sums += r["sums"].cpu()
    if dist.is_initialized():
        dist.all_reduce(sums)
    return sums


def _run_schedule(session: Session, batches: list[dict], forward_only: bool) -> torch.Tensor:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prune.train.distill import teacher_logits_pipelined

    cfg = session.cfg
    queue = None
    if session.teacher is not None and session.info.pp > 1:
        queue = deque(teacher_logits_pipelined(session.teacher, batches, cfg.seq_length, cfg.micro_batch_size))
    results = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, session, queue, teacher_lm=forward_only),
        data_iterator=iter(batches), model=[session.model],
        num_microbatches=len(batches), seq_length=cfg.seq_length, micro_batch_size=cfg.micro_batch_size,
        forward_only=forward_only)
    return _reduce_sums(session, results or [])


def _optimizer_step(session: Session, loss_finite: bool) -> tuple[str | None, float | None]:
    """The megatron optimizer's step with a finiteness check between the grad norm and the update.
    Returns (skip reason or None, grad norm)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    from megatron_prune.train.cpu_compat import cuda_type_names

    opt = session.optimizer
    overflow = opt.prepare_grads()  # fp16: unscale and check; the loss scaler has already backed off
    if not loss_finite:
        return "non-finite", None
    if overflow:
        return "overflow", None
    grad_norm = float(opt.get_grad_norm())
    if not math.isfinite(grad_norm):
        return "non-finite", grad_norm
    if session.cfg.clip_grad > 0:
        with cuda_type_names():
            for inner in getattr(opt, "chained_optimizers", [opt]):
                params = inner.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(params, session.cfg.clip_grad, grad_norm)
    opt.step_with_ready_grads()
    return None, grad_norm


def train_step(session: Session, batches: list[dict]) -> StepResult:
    """One iteration on this rank's micro-batches of a global batch."""
    session.model.zero_grad_buffer()
    session.optimizer.zero_grad()
    session.model.train()
    sums = _run_schedule(session, batches, forward_only=False)
    lm_sum, kd_sum, _, tokens = sums.tolist()
    tokens = max(tokens, 1.0)
    loss = (session.cfg.kd_alpha * kd_sum + (1 - session.cfg.kd_alpha) * lm_sum) if session.teacher else lm_sum
    lr = _current_lr(session)  # the rate this update uses (the scheduler then moves on)
    skipped, grad_norm = _optimizer_step(session, math.isfinite(loss))
    if skipped is None:
        session.scheduler.step(increment=session.cfg.global_batch_size)
    scale = session.optimizer.get_loss_scale().item() if session.cfg.precision == "fp16" else None
    return StepResult(lm_loss=lm_sum / tokens, kd_loss=kd_sum / tokens if session.teacher else None,
                      tokens=int(tokens), grad_norm=grad_norm, lr=lr, skipped=skipped,
                      loss_scale=scale)


def _current_lr(session: Session) -> float:
    groups = [g for g in session.optimizer.param_groups if g.get("default_config", True)]
    return float((groups or session.optimizer.param_groups)[0]["lr"])


def eval_step(session: Session, batches: list[dict]) -> torch.Tensor:
    """[lm_sum, kd_sum, teacher_lm_sum, tokens] of one global validation batch (no gradients)."""
    session.model.eval()
    with torch.no_grad():
        sums = _run_schedule(session, batches, forward_only=True)
    session.model.train()
    return sums


def evaluate(session: Session) -> dict[str, float] | None:
    """Mean losses over the first eval_iters global batches of the validation split (the same batches each
    time, so evaluations are comparable)."""
    if session.data.valid is None:
        return None
    total = torch.zeros(4, dtype=torch.float64)
    for k in range(session.cfg.eval_iters):
        total += eval_step(session, micro_batches(session.data.valid, session.plan, k * session.plan.global_batch_size))
    lm_sum, kd_sum, teacher_sum, tokens = total.tolist()
    out = {"lm_loss": lm_sum / max(tokens, 1.0), "eval_tokens": int(tokens)}
    if session.teacher is not None:
        out["kd_loss"] = kd_sum / max(tokens, 1.0)
        out["teacher_lm_loss"] = teacher_sum / max(tokens, 1.0)
    return out


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class TrainResult:
    history: list[dict]            # one entry per iteration run in this call
    evals: list[dict]
    iteration: int                 # last completed iteration
    saved: list[int]               # iterations checkpointed in this call


def _guard(session: Session, res: StepResult, writer: MetricsWriter) -> None:
    """Report skipped steps; abort after max_bad_steps consecutive non-finite ones."""
    it = session.progress.iteration
    if res.skipped == "overflow":
        writer.message(f"iteration {it}: fp16 gradient overflow, step skipped (loss scale now {res.loss_scale})")
        return
    if res.skipped != "non-finite":
        session.bad_steps = 0
        return
    session.bad_steps += 1
    msg = (f"iteration {it}: non-finite step (lm loss {res.lm_loss}, grad norm {res.grad_norm}); skipped "
           f"({session.bad_steps} in a row, limit {session.cfg.max_bad_steps})")
    writer.message(msg)
    if session.bad_steps >= session.cfg.max_bad_steps:
        raise TrainingAborted(f"{session.bad_steps} consecutive non-finite steps up to iteration {it}: "
                              f"aborting (lower --lr, check the data, or resume from the last checkpoint)")


def save(session: Session) -> None:
    cfg, p = session.cfg, session.progress
    meta = session.meta.with_history("train", iteration=p.iteration, consumed_train_samples=p.consumed_train_samples,
                                     data_path=list(cfg.data_path), lr=cfg.lr, precision=cfg.precision,
                                     teacher=cfg.teacher_load)
    extra = dict(seq_length=cfg.seq_length, micro_batch_size=cfg.micro_batch_size,
                 global_batch_size=cfg.global_batch_size, train_iters=cfg.iterations, lr=cfg.lr, min_lr=cfg.min_lr,
                 lr_warmup_iters=cfg.lr_warmup_iters, lr_decay_style=cfg.lr_decay_style,
                 weight_decay=cfg.weight_decay, clip_grad=cfg.clip_grad, seed=cfg.seed, train_config=cfg.to_dict())
    ckpt.save_checkpoint(cfg.save, p, session.model, session.optimizer, session.scheduler, meta, session.info,
                         extra, cfg.keep_last, session.tokenizer_src, cfg.ckpt_format)


def run(session: Session, stream: TextIO | None = None) -> TrainResult:
    cfg, info = session.cfg, session.info
    metrics_file = cfg.metrics_file or (str(Path(cfg.save) / "metrics.jsonl") if cfg.save else None)
    writer = MetricsWriter(metrics_file, cfg.tensorboard_dir, enabled=info.rank == 0, stream=stream)
    tshape = session.teacher_meta.shape if session.teacher_meta else None
    flops = train_flops_per_token(session.meta.shape, cfg.seq_length, session.meta.padded_vocab_size, tshape,
                                  session.teacher_meta.padded_vocab_size if session.teacher_meta else None)
    peak = cfg.peak_tflops or default_peak_tflops()
    result = TrainResult(history=[], evals=[], iteration=session.progress.iteration, saved=[])
    writer.message(f"training iterations {session.progress.iteration + 1}..{cfg.iterations} | world {info.world_size} "
                   f"= tp {info.tp} x pp {info.pp} x dp {info.dp} | {session.plan.num_microbatches} micro-batches "
                   f"of {cfg.micro_batch_size} x {cfg.seq_length} tokens per rank")
    window = IntervalStats()
    try:
        while session.progress.iteration < cfg.iterations:
            if _one_iteration(session, writer, window, result, flops, peak):
                break
        if session.progress.iteration >= cfg.iterations:
            _maybe_eval(session, writer, result, final=True)
            if cfg.save and session.progress.iteration not in result.saved:
                save(session)
                result.saved.append(session.progress.iteration)
    finally:
        writer.close()
    result.iteration = session.progress.iteration
    return result


def _one_iteration(session: Session, writer: MetricsWriter, window: IntervalStats, result: TrainResult,
                   flops: float, peak: float | None) -> bool:
    """Run, log, evaluate and save one iteration; True when training should stop (exit interval)."""
    cfg, p = session.cfg, session.progress
    start = time.perf_counter()
    first = cfg.skip_samples + p.consumed_train_samples  # this run's data continues after the skipped samples
    res = train_step(session, micro_batches(session.data.train, session.plan, first))
    seconds = time.perf_counter() - start
    session.progress = p = ckpt.Progress(p.iteration + 1, p.consumed_train_samples + cfg.global_batch_size)
    result.history.append({"iteration": p.iteration, "lm_loss": res.lm_loss, "kd_loss": res.kd_loss,
                           "grad_norm": res.grad_norm, "lr": res.lr, "skipped": res.skipped, "step_time_s": seconds})
    _guard(session, res, writer)
    window.add(res, seconds, cfg.tokens_per_iteration)
    if p.iteration % cfg.log_interval == 0 or p.iteration == cfg.iterations:
        writer.write(window.record(p.iteration, p.consumed_train_samples * cfg.seq_length,
                                   session.teacher is not None, flops, session.info.world_size, peak))
        window.reset()
    if cfg.eval_interval and p.iteration % cfg.eval_interval == 0 and p.iteration < cfg.iterations:
        _maybe_eval(session, writer, result)
    stop = bool(cfg.exit_interval) and p.iteration % cfg.exit_interval == 0  # Megatron-LM's --exit-interval
    if cfg.save and ((cfg.save_interval and p.iteration % cfg.save_interval == 0) or stop):
        save(session)
        result.saved.append(p.iteration)
    if stop:
        writer.message(f"exit interval {cfg.exit_interval} reached at iteration {p.iteration}")
    return stop


def _maybe_eval(session: Session, writer: MetricsWriter, result: TrainResult, final: bool = False) -> None:
    if not session.cfg.eval_iters:
        return
    out = evaluate(session)
    if out is None:
        return
    rec = {"kind": "eval", "iteration": session.progress.iteration,
           "tokens": session.progress.consumed_train_samples * session.cfg.seq_length, **out}
    result.evals.append(rec)
    writer.write(rec)
    if final:
        writer.write(final_record(rec), line=final_line(rec))


def final_record(ev: dict) -> dict:
    """The end-of-run validation result as its own metrics record: the student's LM loss beside the teacher's."""
    rec = {"kind": "final", "iteration": ev["iteration"], "tokens": ev["tokens"], "eval_tokens": ev["eval_tokens"],
           "student_lm_loss": ev["lm_loss"]}
    if "teacher_lm_loss" in ev:
        rec.update(teacher_lm_loss=ev["teacher_lm_loss"], gap=ev["lm_loss"] - ev["teacher_lm_loss"],
                   kd_loss=ev["kd_loss"])
    return rec


def final_line(ev: dict) -> str:
    """One line: validation LM loss (perplexity) of the student, and of the teacher when distilling."""
    def ppl(loss: float) -> str:
        return f"{loss:.4f} (ppl {math.exp(min(loss, 700.0)):,.2f})"

    line = (f"final validation ({ev['eval_tokens']:,} held-out tokens of the data's valid split, iteration "
            f"{ev['iteration']}): student LM loss {ppl(ev['lm_loss'])}")
    if "teacher_lm_loss" in ev:
        line += (f" vs teacher {ppl(ev['teacher_lm_loss'])}: gap {ev['lm_loss'] - ev['teacher_lm_loss']:+.4f}; "
                 f"KD loss {ev['kd_loss']:.4f}")
    return line


def train(cfg: TrainConfig, stream: TextIO | None = None) -> TrainResult:
    """Set up this rank and run training (call on every rank, under torchrun)."""
    return run(setup(cfg), stream)
