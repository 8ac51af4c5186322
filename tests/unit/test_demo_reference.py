"""The README's demo numbers live in one place (megatron_prune/demo/reference.json): the README section is its
rendering, a run's comparison reads it, and every process the demo starts has fixed thread settings (issue 23)."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest

from megatron_prune.demo import pipeline, reference, report

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_demo_section_is_rendered_from_reference_json():
    text = README.read_text()
    assert reference.render_readme(text, report.load_reference()) == text, (
        "README's demo section differs from megatron_prune/demo/reference.json: "
        "run python -m megatron_prune.demo.reference")
    assert reference.main(["--check"]) == 0


def test_comparison_says_same_or_names_what_differs():
    ref = report.load_reference()
    run = copy.deepcopy(ref["full"])
    text, same = report.compare(run, ref)
    assert same and "All 7 numbers are the README's" in text
    run["recovery"]["recovered"]["perplexity"] = 257.15
    text, same = report.compare(run, ref)
    assert not same
    readme_ppl = ref["full"]["recovery"]["recovered"]["perplexity"]
    assert f"| recovered perplexity | 257.15 | {readme_ppl:.2f} | DIFFERS |" in text
    assert "1 of 7 numbers differ from the README's" in text and "recovered perplexity." in text
    quick = copy.deepcopy(ref["quick"])
    text, same = report.compare(quick, ref)
    assert same and "All 5 numbers" in text
    tiny = {**run, "model": "tiny LLaMA trained here"}
    assert "No README reference for this run" in report.compare(tiny, ref)[0]


def test_taking_a_run_rewrites_reference_and_readme_together(tmp_path, monkeypatch):
    ref_file, readme = tmp_path / "reference.json", tmp_path / "README.md"
    ref_file.write_text(report.REFERENCE.read_text())
    readme.write_text(README.read_text())
    monkeypatch.setattr(reference, "REFERENCE", ref_file)
    monkeypatch.setattr(report, "REFERENCE", ref_file)
    run = copy.deepcopy(report.load_reference(ref_file)["full"])
    run["recovery"]["recovered"]["perplexity"] = 99.5
    run["environment"] = {"cpu": "x"}
    (tmp_path / "demo_results.json").write_text(json.dumps(run))
    assert reference.main([str(tmp_path / "demo_results.json"), "--readme", str(readme)]) == 0
    taken = json.loads(ref_file.read_text())["full"]
    assert taken["recovery"]["recovered"]["perplexity"] == 99.5 and "seeded_from_readme" not in taken
    loss = run["recovery"]["recovered"]["loss"]  # the row keeps the run's loss beside the new perplexity
    assert f"| 64,047,840 | {loss:.4f} | 99.50 |" in readme.read_text()
    assert reference.main(["--check", "--readme", str(readme)]) == 0


@pytest.mark.parametrize("cores,caller", [(2, None), (16, "4"), (1, "8")])
def test_every_stage_process_gets_the_same_thread_settings(monkeypatch, cores, caller):
    """Thread counts no longer follow the machine's core count or the caller's environment: each stage process
    (here a Python that prints its environment, started by the demo's run_cli through compress's runner) gets the
    demo's settings for its process count."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    if caller:
        monkeypatch.setenv("OMP_NUM_THREADS", caller)
    show_env = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
    monkeypatch.setattr(pipeline, "cli_command", lambda args, nproc: show_env)
    seen = []
    for nproc in (0, 1, 2, 3):
        seen.append(json.loads(pipeline.run_cli(["eval"], nproc=nproc)))
    assert [(env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) for env in seen] == [("2", "2"), ("2", "2"),
                                                                                 ("1", "1"), ("1", "1")]
    assert all(env["MKL_DYNAMIC"] == env["OMP_DYNAMIC"] == "FALSE" for env in seen)


@pytest.mark.parametrize("flags,kernels", [({"sse2", "avx2", "avx512f"}, "avx2"), ({"sse2", "avx2"}, "avx2"),
                                           (set(), None)])
def test_torch_kernels_pinned_to_avx2_where_the_cpu_has_it(monkeypatch, flags, kernels):
    """AVX-512 and AVX2 machines run the same (AVX2) kernels; a CPU without AVX2 (or not x86) is left alone."""
    monkeypatch.setattr(pipeline, "cpu_flags", lambda: flags)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    assert pipeline.numeric_env(2).get("ATEN_CPU_CAPABILITY") == kernels
    assert pipeline.numeric_env(0).get("ATEN_CPU_CAPABILITY") == kernels
