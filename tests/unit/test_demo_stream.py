"""The terminal of compress and the demo (megatron_prune/compress/terminal.py): a stage's output streamed line by
line, progress-bar redraws thinned, and a heartbeat line when a stage is silent."""

from __future__ import annotations

import io
import time

from megatron_prune.compress import terminal as pipeline


class Chunks(io.RawIOBase):
    """A pipe that delivers the given byte chunks one read at a time (as a child's output arrives)."""

    def __init__(self, chunks: list[bytes]):
        self._chunks = list(chunks)

    def readable(self) -> bool:
        return True

    def read1(self, n: int = -1) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""


def pump(chunks: list[bytes], tmp_path, capsys) -> tuple[list[str], list[str], str]:
    keep = []
    sink = pipeline.LogSink(tmp_path / "demo.log")
    pipeline.pump(Chunks(chunks), keep, sink, pipeline.Terminal("demo"))
    sink.close()
    return keep, capsys.readouterr().out.splitlines(), (tmp_path / "demo.log").read_text()


def test_lines_are_indented_on_the_terminal_and_kept_whole(tmp_path, monkeypatch, capsys):
    """A line split across reads (even inside a UTF-8 character) arrives whole; JSON results go to the log only."""
    euro = "€".encode()
    keep, shown, log = pump([b"train iter 2 | lm loss 4.5 ", b"| ok " + euro[:1], euro[1:] + b"\n{\"loss\": 1}\n",
                             b"no newline at the end"], tmp_path, capsys)
    assert keep == ["train iter 2 | lm loss 4.5 | ok €\n", "{\"loss\": 1}\n", "no newline at the end"]
    assert shown == ["    train iter 2 | lm loss 4.5 | ok €", "    no newline at the end"]
    assert log.splitlines() == ["train iter 2 | lm loss 4.5 | ok €", "{\"loss\": 1}", "no newline at the end"]


def test_progress_bar_redraws_are_thinned_but_its_last_state_shown(tmp_path, monkeypatch, capsys):
    """tqdm redraws with carriage returns ('\\r' + bar): the terminal gets the first state, then one per
    BAR_EVERY_S, and the last state before the bar is cleared; never a blank line."""
    monkeypatch.setattr(pipeline, "BAR_EVERY_S", 3600.0)
    bars = b"".join(b"\rconvert: %3d%%" % p for p in range(0, 101, 10))
    keep, shown, _ = pump([bars, b"\r" + b" " * 20 + b"\r", b"wrote ckpt\n"], tmp_path, capsys)
    assert shown == ["    convert:   0%", "    convert: 100%", "    wrote ckpt"]
    assert keep[-1] == "wrote ckpt\n"


def test_a_silent_stage_gets_heartbeat_lines(capsys, monkeypatch):
    term = pipeline.Terminal("demo", heartbeat_s=0.2)
    term.begin("eval pruned")
    deadline = time.monotonic() + 30  # a busy machine may wake the heartbeat thread late; it must still come
    while "still running" not in capsys.readouterr().out and time.monotonic() < deadline:
        time.sleep(0.2)
    term.end()
    assert time.monotonic() < deadline, "no heartbeat line"
    capsys.readouterr()  # a beat printed before end() returned
    time.sleep(2.5)
    assert "still running" not in capsys.readouterr().out, "heartbeat after the stage ended"


def test_the_transcript_holds_what_the_terminal_showed(tmp_path, capsys):
    """The demo's demo.log: every line the terminal printed, the job's own and the stages' (indented)."""
    term = pipeline.Terminal("demo")
    term.copy_to(tmp_path / "demo.log")
    term.job("01-convert: start (job at 0.0 s)")
    keep, sink = [], pipeline.LogSink(tmp_path / "stage.log")
    pipeline.pump(Chunks([b"wrote ckpt\n{\"loss\": 1}\n"]), keep, sink, term)
    sink.close()
    shown = capsys.readouterr().out.splitlines()
    assert shown == ["[demo] 01-convert: start (job at 0.0 s)", "    wrote ckpt"]
    assert (tmp_path / "demo.log").read_text().splitlines() == shown
    assert (tmp_path / "stage.log").read_text().splitlines() == ["wrote ckpt", "{\"loss\": 1}"]
