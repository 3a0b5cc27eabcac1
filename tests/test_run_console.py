"""run-local's console on a fake kfp.local task runner: one line per task, the rest in the log."""

import io
import sys
from types import SimpleNamespace

import pytest
from kfp.local import task_dispatcher

from components.run_console import RunConsole

OK, FAILED = SimpleNamespace(name="SUCCESS"), SimpleNamespace(name="FAILURE")


def fake_task(status, lines):
    def run(**kwargs):
        print("\x1b[36mExecuting task 'x'\x1b[0m")          # what kfp.local logs, coloured
        for line in lines:
            print(f"    {line}")
        print("-" * 40)
        return {"Output": "onnxruntime"}, status
    return run


def run_tasks(console, *tasks):
    with console.capture():
        for name, run, arguments in tasks:
            task_dispatcher.run_single_task_implementation = console._wrap(run)
            task_dispatcher.run_single_task_implementation(component_name=f"comp-{name}", arguments=arguments)


def test_one_line_per_task_with_its_key_figure_and_the_rest_in_the_log(tmp_path):
    out = io.StringIO()
    console = RunConsole(tmp_path / "pipeline.log", 2, {"select": lambda o, a: f"winner {o['Output']}"}, out=out)
    original = task_dispatcher.run_single_task_implementation
    run_tasks(console, ("evaluate", fake_task(OK, ["evaluate: onednn: accuracy 39 %"]), {"backend": "onednn"}),
              ("select", fake_task(OK, ["select: winner onnxruntime"]), {}))
    assert task_dispatcher.run_single_task_implementation is original and sys.stdout is not console._capture
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[1/2] evaluate onednn") and lines[0].endswith(" s  ")
    assert lines[1].startswith("[2/2] select") and lines[1].endswith(" s  winner onnxruntime")
    log = (tmp_path / "pipeline.log").read_text()
    assert "Executing task 'x'" in log and "evaluate: onednn: accuracy 39 %" in log and "\x1b[" not in log
    assert console.failure_report() == f"full log: {tmp_path / 'pipeline.log'}"


def test_a_failed_task_reports_its_last_lines_and_the_log(tmp_path):
    out = io.StringIO()
    console = RunConsole(tmp_path / "pipeline.log", 1, out=out)
    lines = [f"line {i}" for i in range(30)] + ["IngestError: bad.ppm is truncated"]
    run_tasks(console, ("ingest", fake_task(FAILED, lines), {}))
    assert "FAILED after" in out.getvalue()
    report = console.failure_report()
    assert report.startswith("task ingest failed after") and "  | IngestError: bad.ppm is truncated" in report
    assert "line 5\n" not in report and "-----" not in report            # the last lines only, no separators
    assert report.endswith(f"full log: {tmp_path / 'pipeline.log'}")


def test_a_failed_task_with_a_traceback_reports_its_error_not_the_frames(tmp_path):
    out = io.StringIO()
    console = RunConsole(tmp_path / "pipeline.log", 1, out=out)
    lines = ["ingest: downloading GTSRB into /data (about 350 MB) ...", "Traceback (most recent call last):",
             '  File "/x/ingest.py", line 160, in download', "    GTSRB(root=partial, split=split, download=True)",
             "OSError: name resolution", "", "The above exception was the direct cause of the following exception:",
             "", "Traceback (most recent call last):", '  File "/x/ingest.py", line 169, in download',
             "    raise IngestError(", "components.ingest.IngestError: could not download GTSRB into /data",
             "Offline? Point the pipeline at a local copy", "  (indented, still the message)",
             "05:58:07.500 - ERROR - Task 'ingest' finished with status FAILURE"]
    run_tasks(console, ("ingest", fake_task(FAILED, lines), {}))
    report = console.failure_report().splitlines()
    assert report[0].startswith("task ingest failed after") and report[0].endswith("s; its error:")
    assert report[1:5] == ["  | components.ingest.IngestError: could not download GTSRB into /data",
                           "  | Offline? Point the pipeline at a local copy", "  |   (indented, still the message)",
                           "  | 05:58:07.500 - ERROR - Task 'ingest' finished with status FAILURE"]
    assert report[5] == f"full log (with the traceback): {tmp_path / 'pipeline.log'}" and len(report) == 6


def test_verbose_streams_the_log_too(tmp_path):
    out = io.StringIO()
    console = RunConsole(tmp_path / "pipeline.log", 1, verbose=True, out=out)
    run_tasks(console, ("train", fake_task(OK, ["train: epoch 1/1"]), {}))
    text = out.getvalue()
    assert "[1/1] train" in text and "started" in text and "train: epoch 1/1" in text


@pytest.mark.parametrize("figure", [lambda o, a: o["missing"], lambda o, a: int("x")])
def test_a_figure_that_cannot_be_read_does_not_fail_the_run(tmp_path, figure):
    out = io.StringIO()
    console = RunConsole(tmp_path / "pipeline.log", 1, {"select": figure}, out=out)
    run_tasks(console, ("select", fake_task(OK, []), {}))
    assert "reading its outputs" in out.getvalue()


def test_long_labels_keep_the_columns_and_a_skipped_task_ends_the_count(tmp_path):
    out = io.StringIO()
    label = "evaluate onnxruntime-int8"
    console = RunConsole(tmp_path / "pipeline.log", 2, out=out, name_width=len(label))
    run_tasks(console, ("evaluate", fake_task(OK, []), {"backend": "onnxruntime-int8"}))
    console.skipped("serve", "the gate kept the champion")
    ran, skipped = out.getvalue().splitlines()
    assert ran.startswith(f"[1/2] {label} ") and skipped.startswith("[2/2] serve" + " " * (len(label) - 5) + " ")
    assert ran.index(" s  ") + 2 == skipped.index("skipped") + len("skipped"), "the durations' column"
    assert skipped.endswith("skipped  the gate kept the champion")
