"""The run-local console: one line per task, the full log in a file.

kfp.local runs each task as a subprocess, prints its output line by line and logs its own
messages (task start, outputs as JSON-like text, status) through the root logger to
``sys.stdout``, all in this process. :class:`RunConsole` captures that at the Python level:
while it is active, ``sys.stdout`` and ``sys.stderr`` write to the log file (and, verbose, to
the terminal too), and kfp.local's ``run_single_task_implementation`` is wrapped so that every
task shows as one line: its name as it starts, then its duration and one key figure from its
outputs as it ends (``figures``: task name -> function of the task's outputs and arguments).
A failed task's last lines are kept for the error report.
"""

from __future__ import annotations

import re
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TAIL_LINES = 20                 # of a failed task's output, shown on the terminal
NAME_WIDTH = 24
TASK_INDENT = "    "           # kfp.local indents a task's own lines by this


def plain(text: str) -> str:
    """``text`` without terminal colour codes (kfp.local colours task names and statuses)."""
    return ANSI.sub("", text)


def exception_lines(tail: list[str]) -> tuple[list[str], str]:
    """(lines, what they are) of a failed task's last lines: from the exception line on when they
    hold a Python traceback's frames ("its error"), else all of them ("its last lines"). The
    exception line is the first unindented line after the last frame."""
    frames = [i for i, line in enumerate(tail) if line.startswith("  File ")]
    if frames:
        for i in range(frames[-1] + 1, len(tail)):
            if tail[i] and not tail[i][0].isspace():
                return tail[i:], "its error"
    return list(tail), "its last lines"


class _Capture:
    """A text stream for sys.stdout/sys.stderr: every line to the log (colour codes removed),
    the current task's last lines kept, and a copy to ``echo`` when verbose."""

    def __init__(self, log, echo=None):
        self.log, self.echo, self.tail = log, echo, deque(maxlen=TAIL_LINES)
        self._partial = ""

    def write(self, text: str) -> int:
        clean = plain(text)
        self.log.write(clean)
        if self.echo:
            self.echo.write(text)
        lines = (self._partial + clean).split("\n")
        self._partial = lines.pop()
        self.tail.extend(line.rstrip().removeprefix(TASK_INDENT) for line in lines
                         if line.strip(" -"))             # not kfp's separator lines
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        if self.echo:
            self.echo.flush()

    def isatty(self) -> bool:
        return False


class RunConsole:
    def __init__(self, log_path: str | Path, total_tasks: int, figures: dict[str, Callable] | None = None,
                 verbose: bool = False, out=None, name_width: int = NAME_WIDTH):
        self.log_path, self.total, self.figures, self.verbose = Path(log_path), total_tasks, figures or {}, verbose
        self.out = out or sys.stdout
        self.name_width = name_width            # the longest task label's length, or more
        self.started = 0
        self.failed: dict | None = None          # {task, seconds, tail} of the first failed task

    def line(self, text: str = "") -> None:
        """A line for the terminal (outside the captured streams)."""
        self.out.write(text + "\n")
        self.out.flush()

    @contextmanager
    def capture(self):
        from kfp.local import task_dispatcher

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        original = task_dispatcher.run_single_task_implementation
        with open(self.log_path, "w", buffering=1) as log:
            self._capture = _Capture(log, self.out if self.verbose else None)
            saved = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = self._capture
            task_dispatcher.run_single_task_implementation = self._wrap(original)
            try:
                yield self
            finally:
                task_dispatcher.run_single_task_implementation = original
                sys.stdout, sys.stderr = saved

    def _wrap(self, run: Callable) -> Callable:
        def run_task(**kwargs):
            task = kwargs["component_name"].removeprefix("comp-")
            backend = kwargs.get("arguments", {}).get("backend")
            label = f"{task} {backend}" if task == "evaluate" and backend else task
            self.started += 1
            self._start(label)
            self._capture.tail.clear()
            start = time.perf_counter()
            outputs, status = run(**kwargs)
            seconds = time.perf_counter() - start
            if status.name != "SUCCESS":
                self.failed = self.failed or {"task": label, "seconds": seconds, "tail": list(self._capture.tail)}
                self._end(f"FAILED after {seconds:.1f} s")
                return outputs, status
            self._end(f"{seconds:6.1f} s  {self._figure(task, outputs, kwargs.get('arguments', {}))}")
            return outputs, status

        return run_task

    def skipped(self, label: str, why: str) -> None:
        """The line of a task the run did not reach (a branch not taken), so the count ends at the total."""
        self.started += 1
        self.line(f"{self._prefix(label)} {'skipped':>8}  {why}")

    def _prefix(self, label: str) -> str:
        return f"[{self.started:>{len(str(self.total))}}/{self.total}] {label:<{self.name_width}}"

    def _start(self, label: str) -> None:
        text = self._prefix(label)
        if self.verbose:                      # the task's log follows: a line of its own
            self.line(f"{text} started")
        else:                                 # completed in place when the task ends
            self.out.write(text)
            self.out.flush()
        self._label = text

    def _end(self, text: str) -> None:
        self.line(f"{self._label} {text}" if self.verbose else f" {text}")

    def _figure(self, task: str, outputs: dict, arguments: dict) -> str:
        figure = self.figures.get(task)
        if figure is None:
            return ""
        try:
            return figure(outputs, arguments)
        except (KeyError, TypeError, ValueError, OSError) as e:   # a report line must not fail the run
            return f"({type(e).__name__} reading its outputs: {e})"

    def failure_report(self) -> str:
        """The failed task's error (its last lines from the exception on, when they end in a Python
        traceback: the frames are in the log) and where the whole log is."""
        if not self.failed:
            return f"full log: {self.log_path}"
        lines, what = exception_lines(self.failed["tail"])
        tail = "\n".join(f"  | {line}" for line in lines) or "  | (no output)"
        return (f"task {self.failed['task']} failed after {self.failed['seconds']:.1f} s; {what}:\n{tail}\n"
                f"full log{' (with the traceback)' * (what == 'its error')}: {self.log_path}")
