"""The pull-request comment of the pipeline workflow: this run's backend report and gate decision,
compared with main (its backends and the model its run left serving: main's champion).

    python .github/scripts/pr_report.py SUMMARY.json [--baseline MAIN_SUMMARY.json] [--run-url URL] [--commit SHA]

SUMMARY.json is what `make pipeline` wrote (the gate step's summary: select's + `gate`); when it is
missing the run failed, and the comment says so. --baseline is the same file from main's latest
successful run (absent on the first run or when it expired). Writes Markdown to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from components import gate
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


def served_model(summary: dict) -> dict | None:
    """The model a run left serving: its challenger when the gate promoted it, else the champion."""
    decision = summary.get("gate")
    if not decision:
        return None
    return decision["challenger"] if decision["decision"] == gate.PROMOTE else decision["champion"]


def champion_comparison(summary: dict, baseline: dict) -> str:
    """This run's challenger against the model main's latest run left serving (main's champion)."""
    mine, theirs = summary["gate"]["challenger"], served_model(baseline)
    if theirs is None:
        return "\n_Main's summary has no gate decision: no champion to compare with._\n"
    same = mine["test_fingerprint"] == theirs["test_fingerprint"]
    gap = mine["accuracy"] - theirs["accuracy"]
    lines = ["\n## vs main's champion\n", "| | weights sha256 | test accuracy % | test split |", "|---|---|---|---|",
             f"| this pull request | `{mine['weights_sha256'][:12]}…` | {mine['accuracy']:.2f} | "
             f"`{mine['test_fingerprint'][:12]}…` |",
             f"| main's champion | `{theirs['weights_sha256'][:12]}…` | {theirs['accuracy']:.2f} | "
             f"`{theirs['test_fingerprint'][:12]}…` |", ""]
    if same:
        rule = gate.decide(mine["accuracy"], theirs["accuracy"], summary["gate"]["max_regression"], None, "",
                           None, False)[0]
        lines.append(f"Same test split: {gap:+.2f} points; against main's champion the gate would **{rule}** "
                     "(paired counts need both models on one cluster: the run's own gate had none to compare with).")
    else:
        lines.append("Different test splits (the fingerprints differ): the accuracies are not comparable.")
    return "\n".join(lines) + "\n"


def report(summary: dict | None, baseline: dict | None, run_url: str = "", commit: str = "") -> str:
    where = " · ".join(filter(None, [f"commit `{commit[:12]}`" if commit else "",
                                     f"[run]({run_url})" if run_url else ""]))
    head = f"{MARKER}\n# Pipeline on kind (arm64)\n\n" + (f"{where}\n\n" if where else "")
    if summary is None:
        return head + "**The pipeline did not finish**: it produced no summary. See the run's logs.\n"
    body = markdown_report(summary)
    if "gate" in summary:
        body += "\n" + gate.markdown_report(summary["gate"])
    if baseline is not None:
        body += "\n" + comparison(summary, baseline)
        if "gate" in summary:
            body += champion_comparison(summary, baseline)
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
