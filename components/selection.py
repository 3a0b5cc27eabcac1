"""Step 5 — select: choose the serving backend from the evaluations, write the report.

Rule (parameters in brackets):
1. only backends that ran are candidates (skipped ones are listed with their reason);
2. the accuracy guard: test accuracy within ±[accuracy_tolerance] points (default 0.5) of the
   fp32 ``eager`` reference, and top-1 predictions agreeing with the reference on at least
   [min_agreement] % (default 99) of the test images;
3. among those, the lowest median latency at the serving batch size [serving_batch] (default 1)
   wins. Backends tied with it within the measurement's noise (the 95 % bootstrap interval of
   their median ratio, over each one's round medians, contains 1; equal medians where no rounds
   were recorded) are broken by the batch-64 median latency: a winner is not picked by noise.
The same function decides in the pipeline's select step and in ``make bench``.
"""

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kfp.dsl import HTML, Artifact, Input, Markdown, Model, Output

from components import confusion
from components.kfp_step import step
from components.measure import ratio_interval

TIE_BREAK_BATCH = 64
RULE = ("eligible: accuracy within ±{tol} points of the fp32 `eager` reference and top-1 "
        "agreement ≥ {agree} %; winner: lowest median latency at batch {batch}, "
        "ties within noise (95 % interval of the ratio contains 1) broken by batch-64 median latency")


class NoEligibleBackend(RuntimeError):
    pass


def median_ms(result: dict, batch: int) -> float:
    return result["latency"][f"batch{batch}"]["median_ms"]


def guard_verdict(result: dict, accuracy_tolerance: float, min_agreement: float) -> str | None:
    """Why ``result`` fails the accuracy guard (every reason), or None if it passes."""
    gap = result["accuracy"] - result["reference_accuracy"]
    reasons = []
    if abs(gap) > accuracy_tolerance:
        reasons.append(f"accuracy {result['accuracy']:.2f} % is {gap:+.2f} points from the reference "
                       f"{result['reference_accuracy']:.2f} % (tolerance ±{accuracy_tolerance})")
    if result["agreement"] < min_agreement:
        reasons.append(f"top-1 agreement with the reference {result['agreement']:.2f} % < {min_agreement} %")
    return "rejected: " + "; ".join(reasons) if reasons else None


def versus(result: dict, other: dict, batch: int) -> tuple[float, float, float]:
    """result's median latency / other's at ``batch`` with its 95 % interval, bootstrapped over
    each one's round medians (unpaired: the pipeline times backends in separate tasks); the ratio
    alone (low = high = ratio) where no round medians were recorded."""
    mine, theirs = (r["latency"][f"batch{batch}"] for r in (result, other))
    if mine.get("round_medians_ms") and theirs.get("round_medians_ms"):
        return ratio_interval(mine["round_medians_ms"], theirs["round_medians_ms"], paired=False)
    ratio = mine["median_ms"] / theirs["median_ms"]
    return ratio, ratio, ratio


def _tied(interval: tuple[float, float, float]) -> bool:
    """Whether a :func:`versus` ratio's interval contains 1."""
    _, low, high = interval
    return low <= 1.0 <= high


def _loser_verdict(loser: dict, winner: dict, serving_batch: int, interval: tuple[float, float, float]) -> str:
    """``interval``: versus(loser, winner, serving_batch)."""
    mine, best = median_ms(loser, serving_batch), median_ms(winner, serving_batch)
    ratio, low, high = interval
    shown = f", 95 % interval {low:.2f}-{high:.2f}x" if low != high else ""
    if _tied(interval):
        return (f"slower: tied within noise at batch {serving_batch} ({mine:.3f} vs {best:.3f} ms, {ratio:.2f}x"
                f"{shown}), then {median_ms(loser, TIE_BREAK_BATCH):.3f} vs {median_ms(winner, TIE_BREAK_BATCH):.3f}"
                f" ms at batch {TIE_BREAK_BATCH}")
    return f"slower: {mine:.3f} ms vs {best:.3f} ms median at batch {serving_batch} ({ratio:.2f}x{shown})"


def select_winner(results: list[dict], accuracy_tolerance: float = 0.5, min_agreement: float = 99.0,
                  serving_batch: int = 1) -> dict:
    """Apply the rule; returns {winner, rule, parameters, backends: {name: result + verdict}}."""
    if not results:
        raise NoEligibleBackend("no evaluation results to select from")
    names = [r["backend"] for r in results]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate backend results: {names}")
    verdicts, eligible = {}, []
    for r in results:
        if r["status"] != "ok":
            verdicts[r["backend"]] = f"skipped: {r['reason']}"
            continue
        for batch in {serving_batch, TIE_BREAK_BATCH}:
            if f"batch{batch}" not in r["latency"]:
                raise ValueError(f"{r['backend']}: batch {batch} was not measured; measured: {sorted(r['latency'])}")
        verdict = guard_verdict(r, accuracy_tolerance, min_agreement)
        if verdict:
            verdicts[r["backend"]] = verdict
        else:
            eligible.append(r)
    if not eligible:
        raise NoEligibleBackend("no backend passed the accuracy guard: "
                                + "; ".join(f"{k}: {v}" for k, v in verdicts.items()))
    ranked = sorted(eligible, key=lambda r: (median_ms(r, serving_batch), median_ms(r, TIE_BREAK_BATCH)))
    fastest = ranked[0]
    vs_fastest = {r["backend"]: versus(r, fastest, serving_batch) for r in ranked[1:]}   # bootstrapped once each
    tied = [fastest] + [r for r in ranked[1:] if _tied(vs_fastest[r["backend"]])]
    winner = min(tied, key=lambda r: (median_ms(r, TIE_BREAK_BATCH), median_ms(r, serving_batch)))
    ranked = [winner] + [r for r in ranked if r is not winner]
    verdicts[winner["backend"]] = f"winner: {median_ms(winner, serving_batch):.3f} ms median at batch {serving_batch}"
    if len(tied) > 1:
        others = ", ".join(r["backend"] for r in tied if r is not winner)
        verdicts[winner["backend"]] += (f", tied within noise with {others}; fastest of them at batch "
                                        f"{TIE_BREAK_BATCH} ({median_ms(winner, TIE_BREAK_BATCH):.3f} ms)")
    for r in ranked[1:]:
        interval = vs_fastest[r["backend"]] if winner is fastest else versus(r, winner, serving_batch)
        verdicts[r["backend"]] = _loser_verdict(r, winner, serving_batch, interval)
    selection = {
        "winner": winner["backend"],
        "rule": RULE.format(tol=accuracy_tolerance, agree=min_agreement, batch=serving_batch),
        "parameters": {"accuracy_tolerance": accuracy_tolerance, "min_agreement": min_agreement,
                       "serving_batch": serving_batch},
        "ranking": [r["backend"] for r in ranked],
        "backends": {r["backend"]: {k: v for k, v in {**r, "verdict": verdicts[r["backend"]]}.items()
                                    if k != "confusion_matrix"} for r in results},
    }
    if "confusion_matrix" in winner:      # the winner's test errors in words: per class, most-confused pairs
        selection["quality"] = confusion.analysis(winner["confusion_matrix"])
    return selection


# --------------------------------------------------------------------------- the results table
@dataclass(frozen=True)
class Column:
    """One column of the results table: Markdown title, plain-text title and width, and the cell of
    a backend that ran (a skipped backend shows a dash, unless ``always``)."""
    title: str
    short: str
    width: int
    cell: Callable[[dict], str]
    always: bool = False


def _latency(batch: int, key: str, fmt: str) -> Callable[[dict], str]:
    return lambda r: format(r["latency"][f"batch{batch}"][key], fmt)


COLUMNS = {
    "precision": Column("precision", "prec", 6, lambda r: r["precision"], always=True),
    "accuracy": Column("accuracy %", "acc %", 8, lambda r: f"{r['accuracy']:.2f}"),
    "agreement": Column("agreement %", "agree %", 9, lambda r: f"{r['agreement']:.2f}"),
    "b1": Column("b1 median ms", "b1 ms", 9, _latency(1, "median_ms", ".3f")),
    "b1_p99": Column("b1 p99 ms", "b1 p99", 9, _latency(1, "p99_ms", ".3f")),
    "b64": Column("b64 median ms", "b64 ms", 9, _latency(TIE_BREAK_BATCH, "median_ms", ".3f")),
    "b64_p99": Column("b64 p99 ms", "b64 p99", 9, _latency(TIE_BREAK_BATCH, "p99_ms", ".3f")),
    "throughput": Column("images/s (b64)", "img/s", 8, _latency(TIE_BREAK_BATCH, "images_per_second", ".0f")),
    "prepare": Column("prepare s", "prep s", 8, lambda r: f"{r['prepare_seconds']:.1f}"),
}
RUN_COLUMNS = [COLUMNS[k] for k in ("accuracy", "agreement", "b1", "b64")]          # run-local's summary
REPORT_COLUMNS = list(COLUMNS.values())                                            # the select report
NAME_WIDTH = 18


def results_table(selection: dict, columns: list[Column] = RUN_COLUMNS, markdown: bool = False) -> str:
    """Backend | columns... | verdict for every backend of a selection, as aligned text or Markdown
    (the winner in bold)."""
    rows = []
    for name, r in selection["backends"].items():
        ran = r["status"] == "ok"
        cells = [c.cell(r) if ran or c.always else ("–" if markdown else "-") for c in columns]
        rows.append((name, cells, r["verdict"]))
    if markdown:
        lines = ["| backend | " + " | ".join(c.title for c in columns) + " | verdict |",
                 "|" + "---|" * (len(columns) + 2)]
        lines += [f"| {'**' + name + '**' if name == selection['winner'] else name} | " + " | ".join(cells)
                  + f" | {verdict} |" for name, cells, verdict in rows]
        return "\n".join(lines)
    lines = [f"{'backend':<{NAME_WIDTH}}" + "".join(f"{c.short:>{c.width}}" for c in columns) + "  verdict"]
    lines += [f"{name:<{NAME_WIDTH}}" + "".join(f"{cell:>{c.width}}" for c, cell in zip(columns, cells, strict=True))
              + f"  {verdict}" for name, cells, verdict in rows]
    return "\n".join(lines)


def markdown_report(selection: dict, chart_png: bytes | None = None) -> str:
    winner = selection["winner"]
    w = selection["backends"][winner]
    lines = [f"# Backend selection\n\n**Winner: `{winner}`** — {w['description']}.\n",
             f"Rule: {selection['rule']}.\n", results_table(selection, REPORT_COLUMNS, markdown=True) + "\n",
             f"Measured with {w['threads']} threads, {w['latency']['batch1']['runs']} timed runs per batch size "
             f"after warm-up; the reference is fp32 `eager` on the same {w['test_images']} test images.\n"]
    model = selection.get("model")
    if model:
        flops = model.get("flops_per_image")
        lines.append(f"Model: `{model['architecture']}`, weights sha256 `{model['weights_sha256'][:12]}…`"
                     + (f", {flops / 1e6:.1f} MFLOP per image (FlopCounterMode)." if flops else ".") + "\n")
    lines.append("## Why the others lost\n\n" + "\n".join(
        f"- `{name}`: {r['verdict']}" for name, r in selection["backends"].items() if name != winner) + "\n")
    if "quality" in selection:
        lines.append(confusion.markdown(selection["quality"]))
    if chart_png:
        lines.append(f"![latency chart](data:image/png;base64,{base64.b64encode(chart_png).decode()})\n")
    return "\n".join(lines)


def latency_chart(selection: dict) -> bytes:
    """PNG bar chart of median latency per backend at batch 1 and 64 (winner green, guard-rejected red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = {k: v for k, v in selection["backends"].items() if v["status"] == "ok"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(ran) + 1.5))
    for ax, batch in zip(axes, (1, TIE_BREAK_BATCH), strict=True):
        names = list(ran)
        values = [median_ms(ran[n], batch) for n in names]
        colors = ["tab:green" if n == selection["winner"] else
                  "tab:red" if ran[n]["verdict"].startswith("rejected") else "tab:gray" for n in names]
        ax.barh(names, values, color=colors)
        ax.set_xlabel(f"median latency, batch {batch} (ms)")
        ax.invert_yaxis()
    fig.suptitle(f"winner: {selection['winner']} (red: failed the accuracy guard)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def load_results(paths: list[str]) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths]


def model_summary(model_dir: str, model_uri: str) -> dict:
    """What the summary says about the model: where it is and what it is (from its card)."""
    from components.artifact import read_card

    card = read_card(model_dir)
    return {"uri": model_uri, "path": model_dir, "architecture": card["architecture"],
            "weights_sha256": card["weights_sha256"], "flops_per_image": card.get("flops_per_image"),
            "val_accuracy": card.get("training", {}).get("val_accuracy")}


def forward_served(candidate_dirs: list[str], winner: str, weights_sha256: str, out_dir: str) -> dict:
    """Copy the winner's served artifact (the one its evaluate task wrote, verified: every file
    against its sha256, made from the selected model's weights) into ``out_dir``; returns its
    ``serving`` card entry. A skipped backend's empty artifact is passed over."""
    import shutil

    from components.artifact import CARD_FILE, SERVING, read_card, verified_card
    from components.runtime import atomic_dir

    exported = {}
    for directory in candidate_dirs:
        if (Path(directory) / CARD_FILE).is_file():
            exported[read_card(directory)[SERVING]["backend"]] = directory
    if winner not in exported:
        raise NoEligibleBackend(f"no served artifact of the winner {winner!r} among the evaluations' "
                                f"(found: {sorted(exported)})")
    card = verified_card(exported[winner])
    if card["weights_sha256"] != weights_sha256:
        raise ValueError(f"{exported[winner]}: served artifact made from weights {card['weights_sha256']}, "
                         f"not the selected model's {weights_sha256}")
    with atomic_dir(out_dir) as partial:
        for name in [p.name for p in Path(exported[winner]).iterdir() if p.is_file()]:
            shutil.copyfile(Path(exported[winner]) / name, partial / name)
        verified_card(partial)
    return card[SERVING]


def write_selection(result_paths: list[str], model_dir: str, model_uri: str, accuracy_tolerance: float,
                    min_agreement: float, serving_batch: int, summary_path: str, report_path: str,
                    chart_path: str, candidate_dirs: list[str] | None = None, served_dir: str | None = None,
                    served_uri: str | None = None) -> dict:
    """The select step's core: choose, forward the winner's served artifact to ``served_dir``,
    then write the summary JSON, the Markdown report and the HTML chart; returns the summary."""
    selection = select_winner(load_results(result_paths), accuracy_tolerance, min_agreement, serving_batch)
    selection["model"] = model_summary(model_dir, model_uri)
    if served_dir:
        serving = forward_served(candidate_dirs or [], selection["winner"], selection["model"]["weights_sha256"],
                                 served_dir)
        selection["served"] = {"uri": served_uri, "path": served_dir, **serving}
    png = latency_chart(selection)
    Path(summary_path).write_text(json.dumps(selection, indent=2) + "\n")
    Path(report_path).write_text(markdown_report(selection, png))
    Path(chart_path).write_text(f'<img alt="latency per backend" src="data:image/png;base64,'
                                f'{base64.b64encode(png).decode()}">')
    print(f"select: winner {selection['winner']}", flush=True)
    return selection


@step("select")
def select(evaluations: Input[list[Artifact]], candidates: Input[list[Model]], model: Input[Model],
           accuracy_tolerance: float, min_agreement: float, serving_batch: int, summary: Output[Artifact],
           report: Output[Markdown], chart: Output[HTML], served: Output[Model]) -> str:
    """Pick the winning backend; hand its served artifact on (``served``: what its evaluation
    measured); write summary JSON, a Markdown report and an HTML chart."""
    from components.selection import write_selection

    selection = write_selection([e.path for e in evaluations], model.path, model.uri, accuracy_tolerance,
                                min_agreement, serving_batch, summary.path, report.path, chart.path,
                                [c.path for c in candidates], served.path, served.uri)
    served.metadata.update({k: selection["served"][k] for k in ("backend", "format", "sha256")})
    return selection["winner"]
