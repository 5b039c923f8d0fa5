"""Turning report.json into the table the CLI prints and the Prefect artifacts show."""
from __future__ import annotations

from pipeline.evaluate import compare_report


def entries(report: dict) -> list[dict]:
    t = report["teacher"]
    return [{**t, "name": f"teacher: {t['name']}"}] + report["students"]


def report_table(report: dict) -> str:
    return compare_report(entries(report))


def report_rows(report: dict) -> list[dict]:
    rows = []
    for e in entries(report):
        rows.append({"name": e["name"], "accuracy": round(e["accuracy"], 4),
                     "agreement": None if e.get("agreement") is None else round(e["agreement"], 4),
                     "baseline_accuracy": None if e.get("baseline_accuracy") is None else round(e["baseline_accuracy"], 4),
                     "params": e["params"], "size_bytes": e["size_bytes"], "latency_ms": round(e["latency_ms"], 4)})
    return rows


def chart_markdown(report: dict, width: int = 60, height: int = 14) -> str:
    """Accuracy vs size as a text scatter plot (renders anywhere markdown does) plus a table."""
    pts = [(e["size_bytes"], e["accuracy"], e["name"]) for e in entries(report)]
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    import math
    lx = [math.log10(max(x, 1)) for x in xs]
    x0, x1 = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 0.01
    grid = [[" "] * width for _ in range(height)]
    labels = []
    for i, (x, y, name) in enumerate(pts):
        c = int((math.log10(max(x, 1)) - x0) / (x1 - x0) * (width - 1))
        r = height - 1 - int((y - y0) / (y1 - y0) * (height - 1))
        mark = chr(ord("A") + i) if i < 26 else "*"
        grid[r][c] = mark
        labels.append(f"{mark} = {name}")
    lines = [f"{100 * y1:6.2f}% |" + "".join(grid[0])] + ["        |" + "".join(row) for row in grid[1:-1]] + \
            [f"{100 * y0:6.2f}% |" + "".join(grid[-1]), "        +" + "-" * width,
             f"         size (log scale) {min(xs) / 1024:.1f} KiB ... {max(xs) / 1024:.1f} KiB"]
    return "\n".join([f"# {report['name']}: accuracy vs size", "", "```", *lines, "```", "", *[f"- {l}" for l in labels],
                      "", "```", report_table(report), "```"])
