"""Step 5 — select: choose the serving backend from the evaluations, write the report.

Rule (parameters in brackets): among backends that ran, whose test accuracy is within
[accuracy_tolerance] points of the fp32 eager reference and whose top-1 predictions agree
with the reference on at least [min_agreement] % of test images, the lowest median latency at
the serving batch size [serving_batch] wins; ties are broken by batch-64 median latency.
"""

import base64
import io
import json
from pathlib import Path

from kfp.dsl import HTML, Artifact, Input, Markdown, Model, Output

from components.kfp_step import step

RULE = ("eligible: accuracy within ±{tol} points of the fp32 `eager` reference and top-1 "
        "agreement ≥ {agree} %; winner: lowest median latency at batch {batch}, "
        "ties broken by batch-64 median latency")


class NoEligibleBackend(RuntimeError):
    pass


def _latency(result: dict, batch: int) -> float:
    return result["latency"][f"batch{batch}"]["median_ms"]


def select_winner(results: list[dict], accuracy_tolerance: float = 0.5, min_agreement: float = 99.0,
                  serving_batch: int = 1) -> dict:
    """Apply the rule; returns {winner, rule, backends: {name: result + verdict}}."""
    if not results:
        raise NoEligibleBackend("no evaluation results to select from")
    ran = [r for r in results if r["status"] == "ok"]
    if ran and f"batch{serving_batch}" not in ran[0]["latency"]:
        raise ValueError(f"serving_batch {serving_batch} was not measured; "
                         f"measured: {sorted(ran[0]['latency'])}")
    verdicts = {}
    eligible = []
    for r in results:
        if r["status"] != "ok":
            verdicts[r["backend"]] = f"skipped: {r['reason']}"
            continue
        gap = r["accuracy"] - r["reference_accuracy"]
        if abs(gap) > accuracy_tolerance:
            verdicts[r["backend"]] = (f"rejected: accuracy {r['accuracy']:.2f} % is {gap:+.2f} points from "
                                      f"the reference {r['reference_accuracy']:.2f} % (tolerance ±{accuracy_tolerance})")
        elif r["agreement"] < min_agreement:
            verdicts[r["backend"]] = (f"rejected: top-1 agreement with the reference {r['agreement']:.2f} % "
                                      f"< {min_agreement} %")
        else:
            eligible.append(r)
    if not eligible:
        raise NoEligibleBackend("no backend passed the accuracy guard: "
                                + "; ".join(f"{k}: {v}" for k, v in verdicts.items()))
    ranked = sorted(eligible, key=lambda r: (_latency(r, serving_batch), _latency(r, 64)))
    winner = ranked[0]
    verdicts[winner["backend"]] = (f"winner: {_latency(winner, serving_batch):.3f} ms median at batch "
                                   f"{serving_batch}")
    for r in ranked[1:]:
        verdicts[r["backend"]] = (f"slower: {_latency(r, serving_batch):.3f} ms vs "
                                  f"{_latency(winner, serving_batch):.3f} ms median at batch {serving_batch}")
    return {
        "winner": winner["backend"],
        "rule": RULE.format(tol=accuracy_tolerance, agree=min_agreement, batch=serving_batch),
        "parameters": {"accuracy_tolerance": accuracy_tolerance, "min_agreement": min_agreement,
                       "serving_batch": serving_batch},
        "backends": {r["backend"]: {k: v for k, v in {**r, "verdict": verdicts[r["backend"]]}.items()
                                    if k != "confusion_matrix"} for r in results},
    }


def markdown_report(selection: dict, chart_png: bytes | None = None) -> str:
    rows = ["| backend | precision | accuracy % | agreement % | b1 median ms | b1 p99 ms | "
            "b64 median ms | images/s (b64) | verdict |", "|" + "---|" * 9]
    for name, r in selection["backends"].items():
        if r["status"] != "ok":
            rows.append(f"| {name} | {r['precision']} | – | – | – | – | – | – | {r['verdict']} |")
            continue
        b1, b64 = r["latency"]["batch1"], r["latency"]["batch64"]
        rows.append(f"| {'**' + name + '**' if name == selection['winner'] else name} | {r['precision']} | "
                    f"{r['accuracy']:.2f} | {r['agreement']:.2f} | {b1['median_ms']:.3f} | {b1['p99_ms']:.3f} | "
                    f"{b64['median_ms']:.3f} | {b64['images_per_second']:.0f} | {r['verdict']} |")
    text = (f"# Backend selection\n\n**Winner: `{selection['winner']}`**\n\nRule: {selection['rule']}.\n\n"
            + "\n".join(rows) + "\n")
    if chart_png:
        text += f"\n![latency chart](data:image/png;base64,{base64.b64encode(chart_png).decode()})\n"
    return text


def latency_chart(selection: dict) -> bytes:
    """PNG bar chart of median latency per backend at batch 1 and 64."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = {k: v for k, v in selection["backends"].items() if v["status"] == "ok"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(ran) + 1.5))
    for ax, batch in zip(axes, (1, 64), strict=True):
        names = list(ran)
        values = [ran[n]["latency"][f"batch{batch}"]["median_ms"] for n in names]
        colors = ["tab:green" if n == selection["winner"] else "tab:gray" for n in names]
        ax.barh(names, values, color=colors)
        ax.set_xlabel(f"median latency, batch {batch} (ms)")
        ax.invert_yaxis()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def load_results(paths: list[str]) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths]


@step("select")
def select(evaluations: Input[list[Artifact]], model: Input[Model], accuracy_tolerance: float,
           min_agreement: float, serving_batch: int, summary: Output[Artifact],
           report: Output[Markdown], chart: Output[HTML]) -> str:
    """Pick the winning backend; write summary JSON, a Markdown report and an HTML chart."""
    import base64
    import json

    from components.selection import latency_chart, load_results, markdown_report, select_winner

    selection = select_winner(load_results([e.path for e in evaluations]), accuracy_tolerance,
                              min_agreement, serving_batch)
    png = latency_chart(selection)
    card = json.loads(open(f"{model.path}/model_card.json").read())
    selection["model"] = {"uri": model.uri, "path": model.path, "architecture": card["architecture"],
                          "weights_sha256": card["weights_sha256"],
                          "flops_per_image": card.get("flops_per_image")}
    with open(summary.path, "w") as f:
        json.dump(selection, f, indent=2)
    with open(report.path, "w") as f:
        f.write(markdown_report(selection, png))
    with open(chart.path, "w") as f:
        f.write(f'<img alt="latency per backend" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    print(f"select: winner {selection['winner']}")
    return selection["winner"]
