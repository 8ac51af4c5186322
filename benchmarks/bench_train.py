"""Benchmark: tokens/s of our training loop against a bare megatron-core loop, same model and batch, one run.

    python benchmarks/bench_train.py                 # from the repository root; writes RESULTS.md section "train"
    python benchmarks/bench_train.py --no-write --iters 5 --blocks 2

"Ours" is `megatron_prune.train.loop.run` (data from GPTDataset, loss with the padded vocabulary masked out,
loss all-reduce, finiteness guard, metrics). "Bare" is what a minimal megatron-core script does on the same
GPTModel: DDP + get_megatron_optimizer + OptimizerParamScheduler, get_forward_backward_func on one fixed global
batch with GPTModel's own loss (labels=...), optimizer.step(). Short blocks (default one iteration) alternate
between the two in the same processes, so machine noise hits both; the overhead is the ratio of the median
block times (robust to load spikes on a shared machine); beside it the ratio of total wall times and of the
CPU time all ranks spent (process_time: the work each loop does, less exposed to other jobs on the machine).
Target (issue 5): overhead <= 5%.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section  # noqa: E402

MODEL = dict(num_hidden_layers=4, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64)


def prepare(work: Path, tp: int) -> dict:
    """Tiny tokenizer, random HF model of MODEL's shape, its TP checkpoint, and the shipped text indexed."""
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from megatron_prune.checkpoint.convert_files import hf_to_megatron
    from megatron_prune.data.preprocess import PreprocessConfig, preprocess
    from tests.helpers import make_hf_model, save_tiny_tokenizer

    save_tiny_tokenizer(work / "hf")
    vocab = len(AutoTokenizer.from_pretrained(work / "hf"))
    make_hf_model(work / "hf", vocab_size=vocab, **MODEL)
    hf_to_megatron(work / "hf", work / "ckpt", tp=tp, progress=False)
    stats = preprocess(PreprocessConfig([str(ROOT / "megatron_prune/data/samples/train.jsonl")], str(work / "hf"),
                                        str(work / "data"), append_eod=True, progress=False))
    return {"ckpt": str(work / "ckpt"), "data": stats.prefix, "vocab": vocab}


def _bare_setup(session):
    """A second copy of the model with the plain megatron-core training objects."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_prune.checkpoint import megatron_io as mio
    from megatron_prune.model.build import build_model, load_shard
    from megatron_prune.model.load import model_options
    from megatron_prune.train.cpu_compat import cuda_type_names

    cfg, meta, info = session.cfg, session.meta, session.info
    model = build_model(meta.shape, model_options(meta, dtype=cfg.dtype, seq_length=cfg.seq_length))
    load_shard(model, mio.load_rank(cfg.load, info.tp_rank, info.pp_rank)["model"])
    model.config.calculate_per_token_loss = True
    model = DistributedDataParallel(config=model.config, module=model,
                                    ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    model.config.finalize_model_grads_func = finalize_model_grads
    with cuda_type_names():  # CPU only; see train/cpu_compat.py
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr,
                                                     weight_decay=cfg.weight_decay,
                                                     clip_grad=cfg.clip_grad, bf16=cfg.precision == "bf16"), [model])
    sched = OptimizerParamScheduler(opt, 0.0, cfg.lr, cfg.min_lr, 0, cfg.iterations * cfg.global_batch_size, "cosine",
                                    cfg.weight_decay, cfg.weight_decay, 1, "constant")
    return model, opt, sched


def _bare_forward_step(data_iter, model):
    from megatron_prune.model.forward import causal_mask

    b = next(data_iter)
    losses = model(b["tokens"], b["position_ids"], causal_mask(b["tokens"].shape[1]), labels=b["labels"])

    def loss_func(out):
        mask = b["loss_mask"].float()
        loss = (out.float() * mask).sum()
        n = mask.sum().to(__import__("torch").int)
        return loss, n, {"lm loss": __import__("torch").stack([loss.detach(), mask.sum()])}

    return losses, loss_func


def _bare_iteration(model, opt, sched, batches, cfg) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prune.train.cpu_compat import cuda_type_names

    model.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(forward_step_func=_bare_forward_step, data_iterator=iter(batches), model=[model],
                                num_microbatches=len(batches), seq_length=cfg.seq_length,
                                micro_batch_size=cfg.micro_batch_size, forward_only=False)
    with cuda_type_names():
        opt.step()
    sched.step(increment=cfg.global_batch_size)


def worker(p: dict) -> dict:
    """Run on every rank: alternate blocks of our loop and the bare loop; wall seconds per block."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_prune.train.config import TrainConfig
    from megatron_prune.train.data import micro_batches
    from megatron_prune.train.loop import run, setup

    base = TrainConfig(**p["cfg"])
    session = setup(base)
    model, opt, sched = _bare_setup(session)
    batches = micro_batches(session.data.train, session.plan, 0)
    iters, ours, bare = p["iters"], [], []

    def ours_block(n: int) -> tuple[float, float]:
        session.cfg = base.replace(train_iters=session.progress.iteration + n, lr_decay_iters=base.iterations)
        t0, c0 = time.perf_counter(), time.process_time()
        run(session, io.StringIO())
        return time.perf_counter() - t0, time.process_time() - c0

    def bare_block(n: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            _bare_iteration(model, opt, sched, batches, base)
        return time.perf_counter() - t0, time.process_time() - c0

    ours_block(p["warmup"]), bare_block(p["warmup"])
    for _ in range(p["blocks"]):
        ours.append(ours_block(iters))
        bare.append(bare_block(iters))
    return {"ours": [w for w, _ in ours], "bare": [w for w, _ in bare], "ours_cpu": sum(c for _, c in ours),
            "bare_cpu": sum(c for _, c in bare), "world": session.info.world_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--iters", type=int, default=1, help="iterations per timed block")
    ap.add_argument("--blocks", type=int, default=30, help="timed blocks per loop (alternating)")
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--global-batch-size", type=int, default=16)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from megatron_prune.testing import run_distributed

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        prep = prepare(Path(tmp), args.tp)
        total = (args.blocks + 1) * args.iters + 2
        cfg = dict(load=prep["ckpt"], tp=args.tp, micro_batch_size=args.micro_batch_size,
                   global_batch_size=args.global_batch_size, seq_length=args.seq_length, train_iters=total,
                   lr=1e-3, min_lr=1e-4, precision=args.precision, data_path=[prep["data"]], split="99,1,0",
                   eval_iters=0, log_interval=args.iters)
        ranks = run_distributed(args.nproc, "benchmarks.bench_train:worker",
                                {"cfg": cfg, "iters": args.iters, "blocks": args.blocks, "warmup": 2}, timeout=3000)
    res = {**ranks[0], "cpu_overhead": sum(r["ours_cpu"] for r in ranks) / sum(r["bare_cpu"] for r in ranks) - 1.0}
    tokens = args.iters * args.global_batch_size * args.seq_length
    overhead = statistics.median(res["ours"]) / statistics.median(res["bare"]) - 1.0
    print(json.dumps({**res, "tokens_per_block": tokens, "overhead_median": overhead,
                      "overhead_total": sum(res["ours"]) / sum(res["bare"]) - 1.0}, indent=1))
    if not args.no_write:
        write_section("train", _report(args, res, tokens, overhead))
    return 0


def _report(args, res: dict, tokens: int, overhead: float) -> str:
    n, med = len(res["ours"]), statistics.median
    total = sum(res["ours"]) / sum(res["bare"]) - 1.0
    spread = lambda xs: f"{min(xs):.2f} / {med(xs):.2f} / {max(xs):.2f} s"  # noqa: E731
    shape = ", ".join(f"{k}={v}" for k, v in MODEL.items())
    return f"""## Training loop: tokens/s of `train` vs a bare megatron-core loop

Command: `python benchmarks/bench_train.py` (2-core CPU machine shared with other jobs, gloo, torch CPU,
megatron-core 0.16.1). Model: LLaMA {shape}, vocab 300 (tiny BPE); TP={args.tp}, {res['world']} processes,
{args.precision}; micro-batch {args.micro_batch_size} x seq {args.seq_length}, global batch {args.global_batch_size}
({tokens:,} tokens per block of {args.iters} iteration(s)). {n} blocks per loop, alternating ours/bare in the same
processes after 2 warm-up iterations each.

| metric | value | target |
|---|---|---|
| our loop (`train.loop.run`: GPTDataset, masked vocab-parallel loss, guard, metrics), median | {tokens / med(res['ours']):,.0f} tokens/s | |
| bare megatron-core loop (fixed batch, GPTModel loss, `optimizer.step()`), median | {tokens / med(res['bare']):,.0f} tokens/s | |
| overhead of our loop (ratio of median block times) | {overhead:+.1%} | <= 5% ({'met' if overhead <= 0.05 else 'not met'}) |
| overhead, ratio of total wall times (more exposed to load spikes) | {total:+.1%} | |
| overhead, ratio of CPU time of all ranks | {res['cpu_overhead']:+.1%} | |
| block time min / median / max, ours | {spread(res['ours'])} | |
| block time min / median / max, bare | {spread(res['bare'])} | |
"""


if __name__ == "__main__":
    sys.exit(main())
