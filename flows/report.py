"""Turning report.json into the table the CLI prints, the students chart (PNG) and the
Prefect artifacts."""
from __future__ import annotations

import base64
import io
import os

from pipeline.evaluate import compare_report


def entries(report: dict) -> list[dict]:
    t = report["teacher"]
    rows = [{**t, "name": f"teacher: {t['name']}"}]
    for s in report["students"]:
        gain = None if s.get("baseline_accuracy") is None or s.get("mode") == "hard" else \
            s["accuracy"] - s["baseline_accuracy"]
        rows.append({**s, "gain": gain})
    return rows


def footnote(report: dict) -> str:
    """What the baselines and the distilled students learned from (empty for old reports)."""
    d = report.get("data")
    if not d:
        return ""
    steps = {s["mode"]: s.get("steps") for s in report["students"]}
    step_note = ""
    if steps.get("hard") and steps.get("stored"):
        step_note = f" ({steps['hard']:,} vs {steps['stored']:,} steps)"
    ev = report.get("eval_split", "test")
    unit = d.get("unit", "images")
    t = report.get("teacher", {})
    teacher_note = ""
    if t.get("trained_params") is not None and t.get("params") and t["trained_params"] < t["params"]:
        teacher_note = (f"\nteacher: {millions(t['params'])} parameters, {millions(t['trained_params'])} of them "
                        f"fine-tuned (the rest frozen)" + (f", from {t['pretrained']}" if t.get("pretrained") else ""))
    if d["label_split"] == d["labelled_split"]:
        return (f"baseline: the same architecture on the hard labels of the same {d['labelled']:,} "
                f"`{d['labelled_split']}` {unit}, the same {d['views']} views, as many optimizer steps{step_note}.\n"
                f"acc, agree (with the teacher), gain (acc - baseline, points): on the {ev} split." + teacher_note)
    return (f"baseline: the same architecture on the hard labels of the {d['labelled']:,} labelled "
            f"`{d['labelled_split']}` {unit} (the teacher's training set), the same {d['views']} views, as many "
            f"optimizer steps{step_note}.\ndistilled (-kd): only the teacher's stored soft labels of the "
            f"{d['label_samples']:,} unlabelled `{d['label_split']}` {unit} x {d['views']} views, no hard labels.\n"
            f"acc, agree (with the teacher), gain (acc - baseline, points): on the {ev} split." + teacher_note)


def millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def report_table(report: dict) -> str:
    note = footnote(report)
    return compare_report(entries(report)) + (f"\n\n{note}" if note else "")


def report_rows(report: dict) -> list[dict]:
    rows = []
    for e in entries(report):
        rows.append({"name": e["name"], "accuracy": round(e["accuracy"], 4),
                     "agreement": None if e.get("agreement") is None else round(e["agreement"], 4),
                     "baseline_accuracy": None if e.get("baseline_accuracy") is None else round(e["baseline_accuracy"], 4),
                     "params": e["params"], "size_bytes": e["size_bytes"], "latency_ms": round(e["latency_ms"], 4)})
    return rows


def students_png(report: dict) -> bytes:
    """Accuracy vs parameters: hollow grey baselines, filled distilled students, an arrow
    from each baseline to the students distilled into the same architecture, the teacher
    as a dashed line. About 600 x 400 px (tens of KiB, small enough to inline)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in the flow's threads
    from matplotlib.ticker import FuncFormatter, NullLocator

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    t, students = report["teacher"], report["students"]
    base = {s.get("arch_name", s["name"]): s for s in students if s["mode"] == "hard"}
    distilled = [s for s in students if s["mode"] != "hard"]
    # several students of one architecture (a T/alpha/loss sweep) share its parameter count:
    # spread them a little to the right so their arrows stay apart
    seen: dict[str, int] = {}
    xs = []
    for s in distilled:
        i = seen[s.get("arch_name")] = seen.get(s.get("arch_name"), -1) + 1
        xs.append(s["params"] * 1.07 ** i)
    ax.axhline(100 * t["accuracy"], color="0.35", ls="--", lw=1, zorder=1)
    for s, x in zip(distilled, xs):
        b = base.get(s.get("arch_name"))
        if b is None:
            continue
        ax.annotate("", xy=(x, 100 * s["accuracy"]), xytext=(b["params"], 100 * b["accuracy"]),
                    arrowprops={"arrowstyle": "->", "color": "C0", "lw": 1.2, "shrinkA": 4, "shrinkB": 4}, zorder=2)
        ax.annotate(f"{100 * (s['accuracy'] - b['accuracy']):+.1f}",
                    (x, 100 * (s["accuracy"] + b["accuracy"]) / 2), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=8, color="C0")
    if base:
        ax.scatter([b["params"] for b in base.values()], [100 * b["accuracy"] for b in base.values()], s=45,
                   facecolors="white", edgecolors="0.3", linewidths=1.3, zorder=3,
                   label="hard-label baseline")
        for name, b in base.items():
            ax.annotate(name, (b["params"], 100 * b["accuracy"]), xytext=(0, -13), textcoords="offset points",
                        ha="center", fontsize=8, color="0.25")
    if distilled:
        ax.scatter(xs, [100 * s["accuracy"] for s in distilled], s=45, color="C0", zorder=4,
                   label="distilled from stored soft labels")
    accs = [100 * s["accuracy"] for s in students] + [100 * t["accuracy"]]
    lo, hi = min(accs), max(accs)
    ax.set_ylim(lo - 0.15 * (hi - lo) - 0.5, hi + 0.12 * (hi - lo) + 0.5)
    ax.set_xscale("log")
    params = [s["params"] for s in students] + xs
    ax.set_xlim(min(params) / 1.5, max(params) * 1.5)
    # ticks at the students' own sizes, e.g. 25.4K
    ax.set_xticks(sorted({s["params"] for s in students}))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda v, _: f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}K" if v >= 1e3 else f"{v:g}"))
    ax.text(0.01, 100 * t["accuracy"], f" teacher ({t['name']}, {t['params'] / 1e3:.1f}K params): "
            f"{100 * t['accuracy']:.1f}%", transform=ax.get_yaxis_transform(), va="bottom", fontsize=8, color="0.25")
    ax.set_xlabel("student parameters (log scale)")
    ax.set_ylabel(f"{report.get('eval_split', 'test')} accuracy (%)")
    d = report.get("data")
    sub = ""
    if d and d["label_split"] != d["labelled_split"]:
        sub = f"\n{d['labelled']:,} labelled images; {d['label_samples']:,} unlabelled, labelled by the teacher"
    ax.set_title(f"{report['name']}: distilled students vs hard-label baselines{sub}", fontsize=9)
    ax.grid(True, which="major", color="0.9", lw=0.8)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def chart_data_url(report: dict) -> str | None:
    """The students chart (the PNG next to report.json) as a data URL, or None without a PNG.

    Why a data URL in an image artifact: the Prefect UI renders an image artifact's URL
    with <img> (checked in headless Chromium), while its markdown renderer drops data: URLs,
    and the browser cannot read files next to report.json."""
    path = report.get("chart")
    if not path or not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def chart_markdown(report: dict) -> str:
    """The report as markdown (no picture: the UI would not render an inline image)."""
    return "\n".join([f"# {report['name']}: accuracy vs parameters", "", "```", report_table(report), "```"])
