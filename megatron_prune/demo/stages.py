"""The prune -> reshard -> recover part of the demo: each function is one CLI call a user would type."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from megatron_prune.demo.pipeline import last_json, run_cli


@dataclass(frozen=True)
class DemoPlan:
    """Sizes for SmolLM2-135M (30 layers, hidden 576, 9 heads / 3 groups, FFN 1536): about half the parameters."""

    tp: int = 3                  # SmolLM2's 3 query groups allow TP 1 or 3
    layers: int = 20
    hidden: int = 480
    heads: int = 6               # 2 per group, 3 groups: still divisible by TP 3
    groups: int = 3
    ffn: int = 1020              # divisible by 3
    calib_samples: int = 32
    train_iters: int = 60
    seq_length: int = 128
    global_batch: int = 8
    # 1e-3 was bistable: the same 60 iterations ended at held-out ppl 257.15 with torch's AVX-512 kernels
    # (grad-norm spikes up to 299 from iteration 32 on) and 107.62 with its AVX2 ones (issue 23)
    lr: float = 5e-4
    eval_iters: int = 4          # validation batches at the end of training (the held-out text is evaluated apart)
    # distillation recipe, the best of benchmarks/kd_sweep.py (RESULTS.md): T 1 vs 2 x alpha 1.0 vs 0.5 at lr 5e-4
    kd_temperature: float = 2.0
    kd_alpha: float = 0.5        # weight of the KD loss (1 - alpha: the LM loss)
    seed: int = 1234             # training data order

    @classmethod
    def quick(cls) -> "DemoPlan":
        # Recovery is most of the quick demo's time, at ~9 s per 1,024-token iteration on 2 cores. 8 iterations of
        # 512 tokens took the held-out perplexity from 1312 to 491 (< 0.4x) in 51 s; 8 of 1,024 tokens reached 227
        # in 100 s. The quick demo claims "clearly lower" (< 0.7x), not the full run's quality.
        return cls(calib_samples=8, train_iters=8, global_batch=4, eval_iters=1, lr=1e-3)

    def target_args(self, dropped_layers: list[int] | None = None) -> list[str]:
        """The pruner's size arguments; `dropped_layers` names the layers to drop instead of letting it choose."""
        depth = (["--num-layers-remain", str(self.layers)] if dropped_layers is None
                 else ["--drop-layers", ",".join(map(str, dropped_layers))])
        return ["--hidden-size-remain", str(self.hidden), "--num-attention-heads-remain", str(self.heads),
                "--num-query-groups-remain", str(self.groups), "--ffn-hidden-size-remain", str(self.ffn), *depth]


def preprocess(train_jsonl: Path, tokenizer: Path, prefix: Path, log: Path) -> str:
    # One worker: the shipped 340 KB tokenize in well under a second, and a worker pool takes longer to start
    # (measured 8.6 s for the whole stage with 1 worker, 17.0 s with 2).
    run_cli(["preprocess", "--input", str(train_jsonl), "--tokenizer", str(tokenizer), "--output-prefix",
             str(prefix), "--append-eod", "--workers", "1", "--overwrite"], log=log)
    return f"{prefix}_text_document"


def prune(teacher: Path, out: Path, plan: DemoPlan, calib: Path, log: Path, importance: str = "activation",
          dropped_layers: list[int] | None = None, seed: int = 1234) -> dict:
    """Prune to the plan's shape (balance mode), dropping `dropped_layers` when given."""
    calib_args = ["--calib-data", str(calib), "--calib-samples", str(plan.calib_samples), "--calib-seq-length", "256"]
    return last_json(run_cli(
        ["prune", "--load", str(teacher), "--save", str(out), "--importance", importance, "--prune-type", "balance",
         "--seed", str(seed), *(calib_args if importance == "activation" else []),
         *plan.target_args(dropped_layers), "--width-multiple", "1", "--overwrite", "--json"],
        nproc=plan.tp, log=log))


def param_counts(before: Path, after: Path) -> dict:
    from megatron_prune.checkpoint.megatron_io import read_meta

    return {"params_before": read_meta(before).shape.num_params(), "params_after": read_meta(after).shape.num_params()}


def reshard(src: Path, out: Path, tp: int, log: Path) -> None:
    run_cli(["reshard", "--load", str(src), "--save", str(out), "--tp", str(tp), "--overwrite"],
            log=log)


def train(student: Path, teacher: Path | None, data: str, tokenizer: Path, out: Path, plan: DemoPlan,
          log: Path) -> None:
    """Distillation from the unpruned teacher (LM loss alone when teacher is None) on the shipped training text,
    2 data-parallel ranks."""
    kd = ["--teacher-load", str(teacher), "--kd-alpha", str(plan.kd_alpha), "--kd-temperature",
          str(plan.kd_temperature)] if teacher is not None else []
    shutil.rmtree(out, ignore_errors=True)  # `train` resumes from a checkpoint in --save: start afresh each run
    run_cli(["train", "--load", str(student), "--save", str(out), *kd, "--data-path", data,
             "--tokenizer", str(tokenizer), "--split", "98,2,0",
             "--tp", "1", "--micro-batch-size", str(plan.global_batch // 2),
             "--global-batch-size", str(plan.global_batch), "--seq-length", str(plan.seq_length),
             "--train-iters", str(plan.train_iters), "--lr", str(plan.lr), "--min-lr", str(plan.lr / 10),
             "--lr-warmup-iters", str(max(1, plan.train_iters // 10)), "--log-interval", "2",
             "--eval-interval", "0", "--eval-iters", str(plan.eval_iters), "--seed", str(plan.seed), "--fp32"],
            nproc=2, log=log)


def evaluate(ckpt: Path, heldout: Path, tokens: int, nproc: int, log: Path, tokenizer: Path | None = None) -> dict:
    args = ["eval", "--load", str(ckpt), "--text-file", str(heldout), "--seq-length", "512", "--max-tokens",
            str(tokens), "--json"]
    if tokenizer is not None:
        args += ["--tokenizer", str(tokenizer)]
    return last_json(run_cli(args, nproc=nproc, log=log))


def plot(metrics: Path, png: Path, log: Path) -> None:
    run_cli(["plot", str(metrics), "--out", str(png)], log=log)
