"""Training acceptance on CPU + gloo: loss falls, layouts agree, exact resume, distillation, export, guard.

A tiny HF LLaMA (2 layers, hidden 64) with a small BPE tokenizer, trained on the shipped sample text.
All 2-process runs happen in one torchrun launch (see train_cases.py), TP=1 in a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_prune.testing import run_distributed

pytestmark = pytest.mark.dist
SAMPLES = Path(__file__).resolve().parents[2] / "megatron_prune" / "data" / "samples"
SEQ, GBS = 32, 8
KD = dict(kd_alpha=0.7, kd_temperature=2.0)
TD_DO = dict(train_iters=20, lr_warmup_iters=3, lr_decay_style="cosine", clip_grad=0.0, use_distributed_optimizer=True,
             ckpt_format="torch_dist")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict:
    """Tokenizer, HF model, converted checkpoints (tp1, tp2, pp2), indexed shipped text, held-out windows."""
    from transformers import AutoTokenizer

    from megatron_prune.checkpoint.convert_files import hf_to_megatron
    from megatron_prune.data.preprocess import PreprocessConfig, preprocess
    from megatron_prune.data.text import token_windows
    from tests.helpers import make_hf_model, save_tiny_tokenizer

    root = tmp_path_factory.mktemp("train")
    save_tiny_tokenizer(root / "hf")
    vocab = len(AutoTokenizer.from_pretrained(root / "hf"))
    make_hf_model(root / "hf", vocab_size=vocab, num_hidden_layers=2, intermediate_size=128)
    for name, tp, pp in (("tp1", 1, 1), ("tp2", 2, 1), ("pp2", 1, 2)):
        hf_to_megatron(root / "hf", root / name, tp=tp, pp=pp, progress=False)
    # a distillation teacher of another shape (4 layers, ffn 96) and other weights
    save_tiny_tokenizer(root / "teacher_hf")
    make_hf_model(root / "teacher_hf", seed=5, vocab_size=vocab, num_hidden_layers=4, intermediate_size=96)
    for name, pp in (("teacher_tp1", 1), ("teacher_pp2", 2)):
        hf_to_megatron(root / "teacher_hf", root / name, tp=1, pp=pp, progress=False)
    stats = preprocess(PreprocessConfig([str(SAMPLES / "train.jsonl")], str(root / "hf"), str(root / "data" / "train"),
                                        append_eod=True, progress=False))
    tok = AutoTokenizer.from_pretrained(root / "hf")
    text = "\n\n".join(json.loads(line)["text"] for line in (SAMPLES / "heldout.jsonl").read_text().splitlines()[:3])
    heldout = token_windows(tok.encode(text), SEQ, max_tokens=16 * SEQ)
    return {"root": root, "vocab": vocab, "data": stats.prefix, "heldout": heldout}


def _cfg(ws: dict, ckpt: str, **kw) -> dict:
    cfg = dict(load=str(ws["root"] / ckpt), tp=1, pp=1, micro_batch_size=2, global_batch_size=GBS, seq_length=SEQ,
               train_iters=1, lr=3e-3, min_lr=3e-4, lr_warmup_iters=0, precision="fp32", data_path=[ws["data"]],
               split="98,2,0", eval_iters=0, log_interval=1, seed=1234)
    cfg.update(kw)
    return cfg


def _cases(ws: dict) -> list[dict]:
    root, heldout = ws["root"], ws["heldout"].tolist()
    resume = dict(train_iters=20, lr_warmup_iters=3, lr_decay_style="cosine")
    return [
        {"name": "tp2_30", "heldout": heldout,
         "cfg": _cfg(ws, "tp2", tp=2, train_iters=30, lr_warmup_iters=3, eval_iters=2, eval_interval=10,
                     save=str(root / "run_tp2"))},
        {"name": "dp2", "cfg": _cfg(ws, "tp1")},
        {"name": "dp2_distopt", "cfg": _cfg(ws, "tp1", use_distributed_optimizer=True)},
        {"name": "pp2", "cfg": _cfg(ws, "pp2", pp=2)},
        {"name": "sp", "cfg": _cfg(ws, "tp2", tp=2, sequence_parallel=True, train_iters=4)},
        {"name": "tp2_4", "cfg": _cfg(ws, "tp2", tp=2, train_iters=4)},
        # exact resume, TP=2 fp32 and DP=2 distributed optimizer bf16
        {"name": "full", "cfg": _cfg(ws, "tp2", tp=2, save=str(root / "full"), save_interval=5, keep_last=2, **resume)},
        {"name": "finetune", "cfg": _cfg(ws, "full", tp=2, finetune=True, save=str(root / "ft"))},
        {"name": "stop", "cfg": _cfg(ws, "tp2", tp=2, save=str(root / "resumed"), exit_interval=10, **resume)},
        {"name": "resumed", "cfg": _cfg(ws, "tp2", tp=2, save=str(root / "resumed"), **resume)},
        {"name": "full_do", "cfg": _cfg(ws, "tp1", precision="bf16", use_distributed_optimizer=True,
                                        save=str(root / "full_do"), save_interval=10, **resume)},
        {"name": "stop_do", "cfg": _cfg(ws, "tp1", precision="bf16", use_distributed_optimizer=True,
                                        save=str(root / "resumed_do"), exit_interval=10, **resume)},
        {"name": "resumed_do", "cfg": _cfg(ws, "tp1", precision="bf16", use_distributed_optimizer=True,
                                           save=str(root / "resumed_do"), **resume)},
        # torch_dist: exact resume at TP=2 (vs "full"); the distributed optimizer saved at DP=2 resumed at TP=2 x
        # DP=1 (another TP and DP); no clipping, so that every layout follows one trajectory (DP=1 reference: runs_dp1)
        {"name": "stop_td", "cfg": _cfg(ws, "tp2", tp=2, save=str(root / "resumed_td"), exit_interval=10,
                                        ckpt_format="torch_dist", **resume)},
        {"name": "resumed_td", "cfg": _cfg(ws, "tp2", tp=2, save=str(root / "resumed_td"), ckpt_format="torch_dist",
                                           **resume)},
        {"name": "stop_td_do", "cfg": _cfg(ws, "tp1", save=str(root / "td_do"), exit_interval=10, **TD_DO)},
        {"name": "resumed_td_do_tp2", "cfg": _cfg(ws, "tp2", tp=2, load=str(root / "td_do"),
                                                  save=str(root / "td_do_tp2"), **TD_DO)},
        {"name": "kd_self", "cfg": _cfg(ws, "tp2", tp=2, train_iters=2, teacher_load=str(root / "tp2"),
                                        kd_alpha=0.5, kd_temperature=2.0)},
        {"name": "kd_function", "kind": "kd_function", **_kd_inputs()},
        {"name": "kd_dp2", "cfg": _cfg(ws, "tp1", train_iters=3, teacher_load=str(root / "teacher_tp1"), eval_iters=1,
                                       metrics_file=str(root / "kd_dp2.jsonl"), **KD)},
        {"name": "kd_pp2", "cfg": _cfg(ws, "pp2", pp=2, train_iters=3, teacher_load=str(root / "teacher_pp2"), **KD)},
        {"name": "guard", "kind": "guard", "nan_iterations": [2, 4, 5, 6, 7],
         "cfg": _cfg(ws, "tp2", tp=2, train_iters=8, max_bad_steps=3)},
        {"name": "fp16", "cfg": _cfg(ws, "tp2", tp=2, precision="fp16", train_iters=8, initial_loss_scale=2.0 ** 14,
                                     hysteresis=1)},
    ]


def _kd_inputs() -> dict:
    g = torch.Generator().manual_seed(7)
    shape = (2, 5, 24)  # padded vocab 24 over TP=2, true vocab 21: rank 1 holds 3 padded columns
    return {"tp": 2, "true_vocab": 21, "temperature": 1.7,
            "student": (torch.randn(shape, generator=g) * 3).tolist(),
            "teacher": (torch.randn(shape, generator=g) * 3).tolist(),
            "upstream": torch.rand(shape[:2], generator=g).tolist()}


def _script_run(ws: dict) -> dict:
    """TP=1 on one process through the user entry point: scripts/train_recovery.sh -> torchrun -> CLI."""
    import os
    import subprocess
    import sys

    save = ws["root"] / "tp1_run"
    args = ["--load", str(ws["root"] / "tp1"), "--save", str(save), "--data-path", ws["data"], "--split", "98,2,0",
            "--micro-batch-size", "2", "--global-batch-size", str(GBS), "--seq-length", str(SEQ), "--train-iters", "1",
            "--lr", "3e-3", "--min-lr", "3e-4", "--fp32", "--eval-iters", "0", "--log-interval", "1"]
    script = Path(__file__).resolve().parents[2] / "scripts" / "train_recovery.sh"
    out = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHON": sys.executable, "NPROC": "1", "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return {"history": [{"iteration": r["iteration"], "lm_loss": r["lm_loss"]} for r in records],
            "stdout": out.stdout, "stderr": out.stderr}


@pytest.fixture(scope="module")
def runs(ws) -> dict:
    out = run_distributed(2, "tests.dist.train_cases:main", {"cases": _cases(ws)}, timeout=900)
    print("seconds per case:", {k: round(v["seconds"], 1) for k, v in out[0].items()})
    return {**out[0], "tp1": _script_run(ws), "rank1": out[1]}


@pytest.fixture(scope="module")
def runs_dp1(runs, ws) -> dict:
    """One process: the uninterrupted DP=1 reference of the torch_dist distributed-optimizer cases, and the DP=2
    checkpoint (td_do, iteration 10) resumed at DP=1."""
    root = ws["root"]
    cases = [{"name": "ref_dp1", "cfg": _cfg(ws, "tp1", **TD_DO)},
             {"name": "resumed_td_do_dp1", "cfg": _cfg(ws, "tp1", load=str(root / "td_do"),
                                                       save=str(root / "td_do_dp1"), **TD_DO)}]
    return run_distributed(1, "tests.dist.train_cases:main", {"cases": cases}, timeout=900)[0]


def _losses(run: dict) -> list[float]:
    return [h["lm_loss"] for h in run["history"]]


def _first_batch(ws: dict, split: str = "train", first: int = 0, **cfg_kw):
    """The global batch of samples [first, first + GBS) of the dataset a run with `cfg_kw` builds."""
    from megatron_prune.data.tokenizers import load_tokenizer
    from megatron_prune.train.config import TrainConfig
    from megatron_prune.train.data import build_datasets

    cfg = TrainConfig(**_cfg(ws, "tp1", **cfg_kw))
    data = getattr(build_datasets(cfg, load_tokenizer(ws["root"] / "hf")), split)
    batch = [data[i] for i in range(first, first + GBS)]
    return tuple(torch.stack([torch.as_tensor(b[k]) for b in batch]) for k in ("tokens", "labels", "loss_mask"))


def _hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(path).eval()(tokens).logits.float()


def _hf_first_batch_loss(ws: dict, model: str = "hf", split: str = "train", first: int = 0, **cfg_kw) -> float:
    """Independent reference: HF transformers on the first global batch of the same GPTDataset (or the one at
    sample `first`)."""
    tokens, labels, mask = _first_batch(ws, split, first, **cfg_kw)
    logits = _hf_logits(ws["root"] / model, tokens)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    mask = mask.float().reshape(-1)
    return float((ce * mask).sum() / mask.sum())


def _hf_first_batch_kd(ws: dict) -> float:
    """T^2 * KL(teacher || student) per token on the first global batch, from the two HF models."""
    tokens, _, mask = _first_batch(ws)
    temp = KD["kd_temperature"]
    log_ps = torch.log_softmax(_hf_logits(ws["root"] / "hf", tokens).double() / temp, dim=-1)
    log_pt = torch.log_softmax(_hf_logits(ws["root"] / "teacher_hf", tokens).double() / temp, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * temp ** 2
    return float((kl * mask).sum() / mask.sum())


def test_tp2_loss_falls(runs):
    losses = _losses(runs["tp2_30"])
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    first, last5 = losses[0], sum(losses[-5:]) / 5
    assert last5 < first - 1.0, f"loss did not fall clearly: first {first:.4f}, mean of last 5 {last5:.4f}"
    evals = [e["lm_loss"] for e in runs["tp2_30"]["evals"]]
    assert len(evals) == 3 and evals[-1] < evals[0]


def test_first_iteration_loss_agrees_across_layouts(runs, ws):
    ref = _hf_first_batch_loss(ws)
    got = {name: _losses(runs[name])[0] for name in ("tp1", "tp2_30", "dp2", "dp2_distopt", "pp2", "sp")}
    for name, loss in got.items():
        assert abs(loss - ref) <= 1e-4, f"{name}: first-iteration loss {loss:.7f} vs HF reference {ref:.7f}"


def test_skip_samples_starts_at_that_global_batch(ws):
    """--skip-samples N: a fresh run's first iteration trains on samples [N, N + gbs) of the order a run without it
    reads from 0 (one run of 6 iterations = 3 iterations, then 3 more with --skip-samples 3 x gbs: what compress's
    rounds rely on). A one-process launch of its own, so that this test runs without the shared `runs`."""
    skip = 3 * GBS
    cases = [{"name": "skip", "cfg": _cfg(ws, "tp1", train_iters=2, skip_samples=skip)}]
    out = run_distributed(1, "tests.dist.train_cases:main", {"cases": cases}, timeout=600)[0]["skip"]
    # the dataset is sized for skip + the run's samples; within one epoch its order is that of a run from 0
    continued = _first_batch(ws, first=skip, train_iters=2, skip_samples=skip)
    assert all(torch.equal(a, b) for a, b in zip(continued, _first_batch(ws, first=skip, train_iters=5)))
    ref = _hf_first_batch_loss(ws, first=skip, train_iters=2, skip_samples=skip)
    assert ref != pytest.approx(_hf_first_batch_loss(ws), abs=1e-3)  # another batch than the first
    assert abs(_losses(out)[0] - ref) <= 1e-4, (_losses(out)[0], ref)
    assert [h["iteration"] for h in out["history"]] == [1, 2]


def test_script_entry_point_logs_and_saves(runs, ws):
    assert "train iter       1" in runs["tp1"]["stdout"]
    assert "done: iteration 1" in runs["tp1"]["stderr"]
    assert (ws["root"] / "tp1_run" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def test_losses_known_on_every_rank(runs):
    for name in ("tp2_30", "pp2", "dp2"):
        assert _losses(runs[name]) == _losses(runs["rank1"][name])


def test_sequence_parallel_matches_tensor_parallel(runs):
    sp, tp = _losses(runs["sp"]), _losses(runs["tp2_4"])
    assert max(abs(a - b) for a, b in zip(sp, tp)) <= 1e-5, (sp, tp)


@pytest.mark.parametrize("suffix", ["", "_do"])
def test_resume_reproduces_uninterrupted_run(runs, ws, suffix):
    full, stop, resumed = (runs[n + suffix]["history"] for n in ("full", "stop", "resumed"))
    assert [h["iteration"] for h in stop] == list(range(1, 11))
    assert [h["iteration"] for h in resumed] == list(range(11, 21))
    for a, b in zip(full, stop + resumed):
        assert a["iteration"] == b["iteration"]
        assert abs(a["lm_loss"] - b["lm_loss"]) <= 1e-6, (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)


def test_finetune_takes_weights_only(runs, ws):
    ft, full = runs["finetune"]["history"], runs["full"]["history"]
    assert [h["iteration"] for h in ft] == [1]  # iteration 0, fresh optimizer and schedule
    assert ft[0]["lr"] == pytest.approx(3e-3)  # lr_warmup_iters=0: the peak rate at once
    assert ft[0]["lm_loss"] < full[0]["lm_loss"] - 1.0  # trained weights (on the first batch again)
    assert (ws["root"] / "ft" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def test_checkpoint_layout_and_keep_last(runs, ws):
    root = ws["root"] / "full"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "20"
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000015", "iter_0000020"]
    state = torch.load(root / "iter_0000020" / "mp_rank_01" / "model_optim_rng.pt", weights_only=True)
    assert {"model", "args", "optimizer", "opt_param_scheduler", "rng_state", "iteration"} <= set(state)
    assert state["iteration"] == 20 and state["args"].consumed_train_samples == 20 * GBS
    assert (ws["root"] / "resumed_do" / "iter_0000010" / "mp_rank_00" / "distrib_optim_dp001.pt").is_file()
    assert runs["full"]["saved"] == [5, 10, 15, 20]


def test_kd_loss_zero_for_identical_teacher(runs):
    first = runs["kd_self"]["history"][0]
    assert 0.0 <= first["kd_loss"] <= 1e-6
    assert runs["kd_self"]["history"][1]["kd_loss"] > 1e-6  # after one update the student differs


def test_kd_against_hf_teacher_of_another_shape_dp2_and_pp2(runs, ws):
    ref = _hf_first_batch_kd(ws)
    dp2, pp2 = runs["kd_dp2"]["history"], runs["kd_pp2"]["history"]
    assert abs(dp2[0]["kd_loss"] - ref) <= 1e-4 * max(1.0, ref), (dp2[0]["kd_loss"], ref)
    assert ref > 0.1  # a real, different teacher
    for a, b in zip(dp2, pp2):  # PP=2 (teacher pipelined before the step) follows DP=2 step by step
        assert abs(a["kd_loss"] - b["kd_loss"]) <= 1e-5 and abs(a["lm_loss"] - b["lm_loss"]) <= 1e-5, (a, b)
    assert dp2[-1]["kd_loss"] < dp2[0]["kd_loss"]  # alpha = 0.7: the student moves towards the teacher


def test_kd_tp2_matches_full_vocabulary_reference(runs):
    case = _kd_inputs()
    s = torch.tensor(case["student"]).requires_grad_(True)
    t, up, v, temp = torch.tensor(case["teacher"]), torch.tensor(case["upstream"]), case["true_vocab"], case["temperature"]
    log_ps = torch.log_softmax(s[..., :v] / temp, dim=-1)
    log_pt = torch.log_softmax(t[..., :v] / temp, dim=-1)
    ref = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * temp ** 2
    (ref * up).sum().backward()
    r0, r1 = runs["kd_function"], runs["rank1"]["kd_function"]
    assert torch.allclose(r0["loss"], ref.detach(), atol=1e-6) and torch.allclose(r1["loss"], ref.detach(), atol=1e-6)
    grad = torch.cat([r0["grad"], r1["grad"]], dim=-1)
    assert torch.allclose(grad, s.grad, atol=1e-6), (grad - s.grad).abs().max()
    assert torch.all(grad[..., v:] == 0)
    assert r0["teacher_grad"] is None and r1["teacher_grad"] is None


def test_trained_checkpoint_exports_to_hf(runs, ws, tmp_path):
    from transformers import LlamaForCausalLM

    from megatron_prune.checkpoint.convert_files import megatron_to_hf
    from megatron_prune.model.evaluate import evaluate_hf

    megatron_to_hf(ws["root"] / "run_tp2", tmp_path / "hf", progress=False)
    hf = evaluate_hf(LlamaForCausalLM.from_pretrained(tmp_path / "hf"), ws["heldout"])
    trained = runs["tp2_30"]["heldout_loss"]
    assert abs(hf.loss - trained) <= 1e-5, (hf.loss, trained)
    base = evaluate_hf(LlamaForCausalLM.from_pretrained(ws["root"] / "hf"), ws["heldout"])
    assert trained < base.loss - 0.5  # the export carries the trained weights, not the initial ones


def test_non_finite_steps_are_skipped_then_abort(runs):
    g = runs["guard"]
    assert g["error"] and "3 consecutive non-finite steps" in g["error"]
    assert g["iteration"] == 6  # iterations 4, 5, 6 bad in a row -> abort after the third
    assert "iteration 2: non-finite step" in g["log"] and "iteration 6: non-finite step" in g["log"]
    assert "iteration 3: non-finite" not in g["log"]


def test_fp16_dynamic_loss_scaling(runs):
    hist = runs["fp16"]["history"]
    skipped = [h["iteration"] for h in hist if h["skipped"] == "overflow"]
    assert skipped and skipped == list(range(1, len(skipped) + 1)), skipped  # overflows first, then recovers
    good = [h for h in hist if not h["skipped"]]
    assert len(good) >= 2 and all(torch.isfinite(torch.tensor(h["lm_loss"])) for h in good)
    fp32 = _losses(runs["tp2_30"])[0]
    assert abs(hist[0]["lm_loss"] - fp32) < 5e-3  # the fp16 forward is close to fp32's


def test_final_validation_line_student_vs_teacher(runs, ws):
    """The end of a distillation run: one line and one metrics record with the student's and the teacher's LM
    loss on the validation batches; the teacher's equals HF's on the first validation global batch."""
    run = runs["kd_dp2"]
    final = run["evals"][-1]
    ref = _hf_first_batch_loss(ws, "teacher_hf", "valid", train_iters=3, eval_iters=1)
    assert abs(final["teacher_lm_loss"] - ref) <= 1e-4, (final["teacher_lm_loss"], ref)
    line = next(line for line in run["log"].splitlines() if line.startswith("final validation"))
    assert f"student LM loss {final['lm_loss']:.4f}" in line and f"vs teacher {ref:.4f}" in line, line
    assert "gap" in line and "KD loss" in line
    rec = json.loads((ws["root"] / "kd_dp2.jsonl").read_text().splitlines()[-1])
    assert rec["kind"] == "final" and rec["iteration"] == 3 and rec["eval_tokens"] == final["eval_tokens"]
    assert (rec["student_lm_loss"], rec["teacher_lm_loss"]) == (final["lm_loss"], final["teacher_lm_loss"])


def test_torch_dist_resume_reproduces_uninterrupted_run(runs, ws):
    full, stop, resumed = (runs[n]["history"] for n in ("full", "stop_td", "resumed_td"))
    assert [h["iteration"] for h in stop + resumed] == list(range(1, 21))
    for a, b in zip(full, stop + resumed):
        assert abs(a["lm_loss"] - b["lm_loss"]) <= 1e-6, (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    it = ws["root"] / "resumed_td" / "iter_0000010"
    assert {"metadata.json", ".metadata"} <= {p.name for p in it.iterdir()}
    assert not list(it.glob("mp_rank_*"))  # megatron-core's files only


def test_distributed_optimizer_saved_at_dp2_resumes_at_dp1_and_tp2(runs, runs_dp1, ws):
    """torch_dist keeps the distributed optimizer's state across data-parallel and tensor-parallel sizes."""
    ref = {h["iteration"]: h["lm_loss"] for h in runs_dp1["ref_dp1"]["history"]}
    saved = runs["stop_td_do"]["history"]
    assert [h["iteration"] for h in saved] == list(range(1, 11))
    for name, run in (("dp1", runs_dp1["resumed_td_do_dp1"]), ("tp2", runs["resumed_td_do_tp2"])):
        hist = run["history"]
        assert [h["iteration"] for h in hist] == list(range(11, 21)), name
        worst = max(abs(h["lm_loss"] - ref[h["iteration"]]) for h in saved + hist)
        assert worst <= 1e-5, (name, worst)
    assert (ws["root"] / "td_do" / "iter_0000010" / "metadata.json").is_file()  # saved at DP=2 in torch_dist


def test_torch_dist_training_checkpoint_exports_like_legacy(runs, ws, tmp_path):
    from safetensors.torch import load_file

    from megatron_prune.checkpoint.convert_files import megatron_to_hf

    megatron_to_hf(ws["root"] / "resumed_td", tmp_path / "td", progress=False)
    megatron_to_hf(ws["root"] / "full", tmp_path / "legacy", progress=False)  # the same run saved as rank files
    a, b = load_file(tmp_path / "td/model.safetensors"), load_file(tmp_path / "legacy/model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
