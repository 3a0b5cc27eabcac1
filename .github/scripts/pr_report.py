"""The pull-request comment of the pipeline workflow: this run's backend report, compared with main.

    python .github/scripts/pr_report.py SUMMARY.json [--baseline MAIN_SUMMARY.json] [--run-url URL] [--commit SHA]

SUMMARY.json is what `make pipeline` wrote (the select step's summary); when it is missing the run
failed, and the comment says so. --baseline is the same file from main's latest successful run
(absent on the first run or when it expired). Writes Markdown to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from components.selection import markdown_report

MARKER = "<!-- gtsrb-pipeline-report -->"   # pr-report.yml edits the comment that starts with it
MAX_CHARS = 60_000                          # GitHub refuses comments over 65,536 characters


def _load(path: str | None) -> dict | None:
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else None


def _ok(summary: dict, backend: str) -> dict | None:
    result = summary["backends"].get(backend)
    return result if result and result["status"] == "ok" else None


def _delta(new: float, old: float, digits: int) -> str:
    return f"{new:.{digits}f} ({new - old:+.{digits}f})"


def comparison(summary: dict, baseline: dict) -> str:
    """How this run differs from main's: the winner, then accuracy and batch-1 latency per backend."""
    winner, main_winner = summary["winner"], baseline["winner"]
    lines = ["## vs main\n",
             f"Winner: `{winner}`" + (" (same as main)" if winner == main_winner else f" (main: `{main_winner}`)")
             + "\n",
             "| backend | accuracy % (Δ points) | b1 median ms (Δ) | b64 median ms (Δ) |", "|---|---|---|---|"]
    for name in summary["backends"]:
        now, before = _ok(summary, name), _ok(baseline, name)
        if now is None or before is None:
            lines.append(f"| {name} | {'not run here' if now is None else 'not run on main'} | – | – |")
            continue
        latency = [_delta(now["latency"][b]["median_ms"], before["latency"][b]["median_ms"], 3)
                   for b in ("batch1", "batch64")]
        lines.append(f"| {name} | {_delta(now['accuracy'], before['accuracy'], 2)} | {latency[0]} | {latency[1]} |")
    lines.append("\nLatency is measured on a shared GitHub runner: differences of a few percent are noise.")
    return "\n".join(lines) + "\n"


def report(summary: dict | None, baseline: dict | None, run_url: str = "", commit: str = "") -> str:
    where = " · ".join(filter(None, [f"commit `{commit[:12]}`" if commit else "",
                                     f"[run]({run_url})" if run_url else ""]))
    head = f"{MARKER}\n# Pipeline on kind (arm64)\n\n" + (f"{where}\n\n" if where else "")
    if summary is None:
        return head + "**The pipeline did not finish**: it produced no summary. See the run's logs.\n"
    body = markdown_report(summary)
    if baseline is not None:
        body += "\n" + comparison(summary, baseline)
    else:
        body += "\n_No summary from main to compare with yet._\n"
    text = head + body
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + "\n\n_(truncated)_\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summary")
    parser.add_argument("--baseline")
    parser.add_argument("--run-url", default="")
    parser.add_argument("--commit", default="")
    args = parser.parse_args(argv)
    sys.stdout.write(report(_load(args.summary), _load(args.baseline), args.run_url, args.commit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
