"""The terminal of a multi-stage job (`compress`, the demo): one line at a time, each stage's own output streamed
live and indented under the job's "[TAG] ..." lines, progress-bar redraws thinned, and a heartbeat line when a
stage has printed nothing for a while, so the terminal never stays silent for long whatever the stage (an
in-process evaluation, a torchrun start-up, a slow machine). Every line also goes to the stage's log file."""

from __future__ import annotations

import codecs
import contextlib
import re
import threading
import time
from pathlib import Path
from typing import IO

# A stage that has printed nothing for this long gets a "still running" line.
HEARTBEAT_S = 10.0
# A progress bar redraws its line (carriage returns); the terminal gets one of its states this often at most.
BAR_EVERY_S = 5.0
INDENT = "    "  # a stage's own output, under the job's line that opened the stage


class Terminal:
    """Lines come from several reader threads; a heartbeat thread says which stage is still running when nothing
    was printed for `heartbeat_s`. `tag` starts every line of the job's own ("[compress] ...")."""

    def __init__(self, tag: str = "compress", heartbeat_s: float = HEARTBEAT_S, stream=None):
        self.tag, self.heartbeat_s = tag, heartbeat_s
        self._stream = stream  # None: sys.stdout at the time of printing (pytest's capture replaces it)
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stage: tuple[str, float] | None = None
        self._thread: threading.Thread | None = None
        self._copy: IO[str] | None = None

    def copy_to(self, path: Path) -> None:
        """Append every line from now on to `path` too (the demo's demo.log: the terminal's transcript)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._copy = open(path, "a")

    def say(self, line: str) -> None:
        import sys

        with self._lock:
            print(line, file=self._stream or sys.stdout, flush=True)
            if self._copy is not None:
                self._copy.write(line + "\n")
                self._copy.flush()
            self._last = time.monotonic()

    def job(self, text: str) -> None:
        """One line of the job's own: "[TAG] text"."""
        self.say(f"[{self.tag}] {text}")

    def begin(self, name: str, opening: str | None = None) -> None:
        with self._lock:
            self._stage = (name, time.monotonic())
        if self._thread is None:  # started by the first stage, not on import
            self._thread = threading.Thread(target=self._beat, name=f"{self.tag}-heartbeat", daemon=True)
            self._thread.start()
        self.job(opening or f"{name} ...")

    def end(self) -> None:
        with self._lock:
            self._stage = None

    @contextlib.contextmanager
    def stage(self, name: str, opening: str | None = None):
        self.begin(name, opening)
        try:
            yield
        finally:
            self.end()

    def _beat(self) -> None:
        import sys

        while True:
            time.sleep(1.0)
            with self._lock:
                now = time.monotonic()
                if self._stage is not None and now - self._last >= self.heartbeat_s:
                    name, start = self._stage
                    print(f"[{self.tag}] ... still running: {name}, {now - start:.0f} s",
                          file=self._stream or sys.stdout, flush=True)
                    self._last = now


class LogSink:
    """A stage's log file, appended by both reader threads of a command (one line at a time)."""

    def __init__(self, path: Path | None):
        self._lock = threading.Lock()
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a")

    def write(self, line: str) -> None:
        if self._file is not None:
            with self._lock:
                self._file.write(line + "\n")
                self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def pump(stream: IO[bytes], keep: list[str], sink: LogSink, terminal: Terminal | None) -> None:
    """Copy a command's output stream: every line into `keep`, the log and the terminal (indented; none when
    `terminal` is None). A progress bar's redraws (segments ended by a carriage return) reach the terminal and the
    log every BAR_EVERY_S at most, and its last state before it is cleared or followed by a line; JSON result lines
    reach only the log (the job prints its own summary of them)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two reads
    pending, last_bar, held = "", float("-inf"), None
    for chunk in iter(lambda: stream.read1(65536), b""):
        *segments, pending = _segments(pending + decoder.decode(chunk))
        for text, end in segments:
            if end != "\r":
                keep.append(text + "\n")
            if not text.strip() or end != "\r":
                if held is not None:  # the bar's last state, before it is cleared or a line follows
                    _show(held, sink, terminal)
                    held = None
            elif time.monotonic() - last_bar < BAR_EVERY_S:
                held = text
                continue
            else:
                last_bar, held = time.monotonic(), None
            if text.strip():
                _show(text, sink, terminal)
    pending += decoder.decode(b"", final=True)
    if held is not None:
        _show(held, sink, terminal)
    if pending.strip():
        keep.append(pending)
        _show(pending, sink, terminal)
    stream.close()


def _show(text: str, sink: LogSink, terminal: Terminal | None) -> None:
    sink.write(text)
    if terminal is not None and not text.startswith("{"):
        terminal.say(INDENT + text.rstrip())


def _segments(text: str) -> list:
    """[(segment, terminator), ...] for each complete segment of `text`, then the unterminated rest."""
    parts = re.split(r"(\r\n|\n|\r)", text)
    done = [(parts[i], "\n" if parts[i + 1] == "\r\n" else parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
    return [*done, parts[-1]]
