"""One report for every task: report.json's students next to their baselines, the rows
over seeds, the table the CLI prints, report.md, the students chart (PNG) and the Prefect
artifacts. The task's validation metric decides the columns and which way is better:
accuracy (classifiers; gain in points) or perplexity (language models; gain in percent,
negative is better)."""

from __future__ import annotations

import base64
import io
import math
import os
import statistics

# the table's columns per metric: (entry key, header)
COLUMNS = {
    "accuracy": [
        ("name", "name"),
        ("accuracy", "acc"),
        ("agreement", "agree"),
        ("params", "params"),
        ("size_bytes", "size"),
        ("latency_ms", "latency"),
        ("baseline", "baseline"),
        ("gain", "gain"),
    ],
    "perplexity": [
        ("name", "name"),
        ("perplexity", "ppl"),
        ("bits_per_byte", "bits/byte"),  # comparable across tokenizers
        ("params", "params"),
        ("initial", "start"),  # a pruned or pretrained student's ppl before training
        ("steps", "steps"),
        ("baseline", "baseline"),
        ("gain", "gain"),
        ("closed", "gap closed"),  # of the baseline-to-teacher gap
    ],
}
# columns printed only when some entry has a value
OPTIONAL = ("gain", "initial", "closed", "bits_per_byte")


def millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(int(n))


def gain(metric: str, value: float, baseline: float) -> float:
    """accuracy: points over the baseline (a fraction); perplexity: the relative change."""
    return value - baseline if metric == "accuracy" else value / baseline - 1.0


# ------------------------------------------------------------------ rows


def is_baseline(r: dict) -> bool:
    """The hard-label baseline: CE on the data's own labels (a language model: the human
    text; CE on the teacher's written answers is sequence-level KD, a distilled student)."""
    return r.get("loss") == "ce" and r.get("data", "human") == "human"


def with_baselines(results: list[dict], metric: str, higher_is_better: bool) -> list[dict]:
    """Each student with its architecture's baseline (is_baseline) of the same seed:
    "baseline" (its metric) and "gain" (None for a baseline itself)."""
    base = {(r["arch_name"], r["seed"]): r for r in results if is_baseline(r)}
    out = []
    for r in results:
        b = base.get((r["arch_name"], r["seed"]))
        v = None if b is None else b[metric]
        out.append(
            r
            | {"baseline": v, "gain": None if b is None or is_baseline(r) else gain(metric, r[metric], v)}
            | ({"baseline_bpb": b.get("bits_per_byte")} if b is not None and "bits_per_byte" in r else {})
        )
    return out


def gap_closed(
    rows: list[dict], metric: str, teacher_value: float | None, teacher_bpb: float | None = None
) -> list[dict]:
    """Each distilled row with "closed": the fraction of the gap between its baseline and
    the teacher that distillation closed, (baseline − value) / (baseline − teacher), per
    seed too ("closed_per_seed"); perplexity only (accuracy reports the gain in points).
    A student with its own tokenizer is measured in bits per byte (its perplexity counts
    other tokens than the teacher's)."""
    if metric != "perplexity" or teacher_value is None:
        return rows
    out = []
    for r in rows:
        own = r.get("tokenizer") is not None
        t, key = (teacher_bpb, "bits_per_byte") if own else (teacher_value, metric)
        b, bs = (
            (r.get("baseline_bpb"), r.get("baseline_bpb_per_seed"))
            if own
            else (r.get("baseline"), r.get("baseline_per_seed"))
        )
        if r.get("gain") is None or b is None or t is None or b <= t:
            out.append(r)
            continue
        vals = r.get("bpb_per_seed") if own else r["per_seed"]
        per = [None if bb is None or v is None else (bb - v) / (bb - t) for v, bb in zip(vals or [], bs or [])]
        out.append(r | {"closed": (b - r[key]) / (b - t), "closed_per_seed": per})
    return out


def aggregate(students: list[dict], metric: str) -> list[dict]:
    """One row per (architecture, loss, T, alpha): mean and std over seeds of the metric and
    the gain, and the per-seed values (report.md's per-seed table)."""
    groups: dict[tuple, list[dict]] = {}
    for s in students:
        key = (s["arch_name"], s["loss"], s.get("temperature"), s.get("alpha"), s.get("data", "human"))
        groups.setdefault(key, []).append(s)
    rows = []
    for (arch, loss, T, a, data), rs in groups.items():
        vals = [r[metric] for r in rs]
        gains = [r["gain"] for r in rs if r.get("gain") is not None]
        pre = f"{arch}-seqkd" if data == "generated" else arch
        name = (pre if data == "generated" else f"{arch}-baseline") if loss == "ce" else f"{pre}-T{T:g}-a{a:g}-{loss}"
        row = {
            k: rs[0].get(k)
            for k in (
                "arch_name",
                "loss",
                "temperature",
                "alpha",
                "data",
                "mode",
                "params",
                "size_bytes",
                "latency_ms",
                "steps",
                "tokenizer",
            )
        }
        row |= {
            "name": name,
            "seeds": [r["seed"] for r in rs],
            metric: statistics.fmean(vals),
            f"{metric}_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "per_seed": vals,
            "baseline": _mean([r.get("baseline") for r in rs]),
            "baseline_per_seed": [r.get("baseline") for r in rs],
            "initial": _mean([r.get("initial") for r in rs]),
            "gain": _mean(gains) if gains else None,
            "gain_per_seed": gains,
        }
        if all(r.get("bits_per_byte") is not None for r in rs):  # language models: comparable across tokenizers
            row |= {
                "bits_per_byte": statistics.fmean(r["bits_per_byte"] for r in rs),
                "bpb_per_seed": [r["bits_per_byte"] for r in rs],
                "baseline_bpb": _mean([r.get("baseline_bpb") for r in rs]),
                "baseline_bpb_per_seed": [r.get("baseline_bpb") for r in rs],
            }
        if any(r.get("agreement") is not None for r in rs):
            row["agreement"] = _mean([r.get("agreement") for r in rs])
        rows.append(row)
    return rows


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


# ------------------------------------------------------------------ the table


def _fmt(metric: str, key: str, v, std: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key in ("accuracy", "agreement") or (key == "baseline" and metric == "accuracy"):
        return f"{100 * v:.2f}%" + (f"±{100 * std:.2f}" if std else "")
    if key == "bits_per_byte":
        return f"{v:.3f}"
    if key in ("perplexity", "baseline", "initial"):
        return f"{v:.1f}" + (f"±{std:.1f}" if std else "")
    if key == "closed":
        return f"{100 * v:.0f}%"
    if key == "gain":
        return f"{100 * v:+.2f}" if metric == "accuracy" else f"{100 * v:+.0f}%"
    if key == "params":
        return millions(v)
    if key == "size_bytes":
        return f"{v / 2**20:.2f}MiB" if v >= 2**20 else f"{v / 2**10:.1f}KiB"
    if key == "latency_ms":
        return f"{v:.3f}ms"
    if key == "steps":
        return f"{v:,}"
    return str(v)


def entries(report: dict) -> list[dict]:
    """The table's rows: the teacher, then each row over seeds (one per student with one seed)."""
    t = report["teacher"]
    return [{**t, "name": f"teacher: {t['name']}"}] + list(report.get("rows") or report["students"])


def format_table(entries: list[dict], metric: str = "accuracy") -> str:
    """Plain-text table of entries (dicts with the metric's COLUMNS keys; a missing value
    prints "-"); the gain column only when some entry has a gain."""
    if not entries:
        raise ValueError("the table needs at least one entry")
    columns = [c for c in COLUMNS[metric] if c[0] not in OPTIONAL or any(e.get(c[0]) is not None for e in entries)]
    rows = [[h for _, h in columns]]
    for e in entries:
        if "name" not in e:
            raise ValueError(f"every entry needs a 'name', got keys {sorted(e)}")
        rows.append([_fmt(metric, k, e.get(k), e.get(f"{metric}_std") if k == metric else None) for k, _ in columns])
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def footnote(report: dict) -> str:
    """What the baselines and the distilled students learned from (empty for old reports)."""
    d = report.get("data")
    if not d:
        return ""
    seeds = f", mean±std over {d['seeds']} seeds" if d.get("seeds", 1) > 1 else ""
    if report.get("metric") == "perplexity":
        return _lm_footnote(report, d, seeds)
    steps = {s["mode"]: s.get("steps") for s in report["students"]}
    step_note = ""
    if steps.get("hard") and steps.get("stored"):
        step_note = f" ({steps['hard']:,} vs {steps['stored']:,} steps)"
    ev = report.get("eval_split", "test")
    unit = d.get("unit", "images")
    t = report.get("teacher", {})
    teacher_note = ""
    if t.get("trained_params") is not None and t.get("params") and t["trained_params"] < t["params"]:
        teacher_note = (
            f"\nteacher: {millions(t['params'])} parameters, {millions(t['trained_params'])} of them "
            f"fine-tuned (the rest frozen)" + (f", from {t['pretrained']}" if t.get("pretrained") else "")
        )
    if d["label_split"] == d["labelled_split"]:
        return (
            f"baseline: the same architecture on the hard labels of the same {d['labelled']:,} "
            f"`{d['labelled_split']}` {unit}, the same {d['views']} views, as many optimizer steps{step_note}.\n"
            f"acc, agree (with the teacher), gain (acc - baseline, points): on the {ev} split{seeds}." + teacher_note
        )
    return (
        f"baseline: the same architecture on the hard labels of the {d['labelled']:,} labelled "
        f"`{d['labelled_split']}` {unit} (the teacher's training set), the same {d['views']} views, as many "
        f"optimizer steps{step_note}.\ndistilled (-kd): only the teacher's stored soft labels of the "
        f"{d['label_samples']:,} unlabelled `{d['label_split']}` {unit} x {d['views']} views, no hard labels.\n"
        f"acc, agree (with the teacher), gain (acc - baseline, points): on the {ev} split{seeds}." + teacher_note
    )


def _lm_footnote(report: dict, d: dict, seeds: str) -> str:
    lines = []
    for layout, s in (report.get("labels") or {}).items():
        tok = s.get("tokens") or {}
        if not tok:
            continue
        what = (
            f"top-{tok['k']} {tok['dtype']} log-probs + missing mass (mean {tok['mean']:.3f})"
            if layout == "topk"
            else f"{tok['draws']} draws (mean {tok['mean']:.1f} unique ids per token)"
        )
        lines.append(f"labels {layout}: {tok['num_tokens']:,} tokens, {what}: {tok['bytes_per_token']:.1f} bytes/token")
    size = (
        f"x {d['seq_len']} tokens"
        if d.get("windows", "packed") == "packed"
        else f"of up to {d['seq_len']} tokens, never crossing a document"
    )
    alphas = d.get("alphas") or [0.0]
    kd = " / ".join(f"{a:g} x CE + {1 - a:g} x KD" if a else "KD alone" for a in alphas)
    if d.get("windows") == "turns":  # chat: conversations, assistant tokens only
        lines.append(
            f"students: {d['train_conversations']:,} train conversations ({d['train_windows']:,} windows of up to "
            f"{d['seq_len']} tokens, whole turns; {d['labelled_share']:.0%} of positions are assistant targets, the "
            f"only ones labelled and trained on), equal steps per student; ppl on the {d['eval_tokens']:,} "
            f"assistant tokens of {d['eval_conversations']:,} held-out `{d['eval_split']}` conversations{seeds}. "
            f"baseline: next-token cross-entropy only; the others: {kd} from the stored teacher labels; gain: "
            f"ppl vs baseline."
        )
        g = d.get("generated")
        if g:
            written = f"{g['tokens']:,} tokens" if g.get("tokens") is not None else "answers"
            lines.append(
                f"seqkd (sequence-level KD): CE on the teacher's own {written}, {g['answers']} answer(s) to each of "
                f"{g['prompts']:,} train prompts (temperature {g['temperature']:g}, top-p {g['top_p']:g}, at most "
                f"{g['max_new_tokens']} tokens); seqkd-T-a-loss: alpha x that CE + (1 - alpha) x KD from the written "
                f"tokens' stored labels; as many steps as the students of the human answers."
            )
        return "\n".join(lines)
    lines.append(
        f"students: {d['train_windows']:,} train windows {size}, equal steps per student; ppl on "
        f"{d['eval_windows']:,} held-out `{d['eval_split']}` windows{seeds}. baseline: next-token "
        f"cross-entropy only; the others: {kd} from the stored teacher labels; gain: ppl vs baseline."
    )
    return "\n".join(lines)


def report_table(report: dict) -> str:
    note = footnote(report)
    return format_table(entries(report), report.get("metric", "accuracy")) + (f"\n\n{note}" if note else "")


def report_markdown(report: dict) -> str:
    """report.md: the table, the per-seed values when there are several seeds, the chart."""
    metric = report.get("metric", "accuracy")
    out = [f"# {report['name']}", "", "```", report_table(report), "```", ""]
    rows = report.get("rows") or []
    if any(len(r["seeds"]) > 1 for r in rows):
        seeds = rows[0]["seeds"]
        out += [
            "| student | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
            "|---|" + "---|" * (len(seeds) + 1),
        ]
        for r in rows:
            vals = [_fmt(metric, metric, v) for v in r["per_seed"]]
            gains = [_fmt(metric, "gain", g) for g in r["gain_per_seed"]] or ["" for _ in vals]
            closed = [f", {_fmt(metric, 'closed', c)} of the gap" for c in r.get("closed_per_seed") or []]
            closed += [""] * (len(vals) - len(closed))
            cells = [f"{v} ({g}{c})" if g else v for v, g, c in zip(vals, gains + [""] * len(vals), closed)]
            out.append(f"| {r['name']} | " + " | ".join(cells) + f" | {_fmt(metric, metric, r[metric])} |")
        out.append("")
    out.append("![students](students.png)")
    return "\n".join(out) + "\n"


def report_rows(report: dict) -> list[dict]:
    """The Prefect table artifact's rows (rounded numbers)."""
    metric = report.get("metric", "accuracy")
    keys = [k for k, _ in COLUMNS[metric]]
    return [{k: (round(e[k], 4) if isinstance(e.get(k), float) else e.get(k)) for k in keys} for e in entries(report)]


# ------------------------------------------------------------------ the chart


def students_png(report: dict) -> bytes:
    """The metric vs parameters: hollow grey baselines, filled distilled students, an arrow
    from each baseline to the students distilled into the same architecture, the teacher
    as a dashed line (perplexity on a log scale, lower is better). About 600 x 400 px (tens
    of KiB, small enough to inline)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in the flow's threads
    from matplotlib.ticker import FuncFormatter, NullLocator

    metric = report.get("metric", "accuracy")
    acc = metric == "accuracy"
    scale = 100.0 if acc else 1.0

    def y(v):
        return scale * v

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    t, students = report["teacher"], list(report.get("rows") or report["students"])
    base = {s.get("arch_name", s["name"]): s for s in students if s.get("mode") == "hard" or is_baseline(s)}
    distilled = [s for s in students if s not in base.values()]
    # several students of one architecture (a T/alpha/loss sweep) share its parameter count:
    # spread them a little to the right so their arrows stay apart
    seen: dict[str, int] = {}
    xs = []
    for s in distilled:
        i = seen[s.get("arch_name")] = seen.get(s.get("arch_name"), -1) + 1
        xs.append(s["params"] * 1.07**i)
    ax.axhline(y(t[metric]), color="0.35", ls="--", lw=1, zorder=1)
    for s, x in zip(distilled, xs):
        b = base.get(s.get("arch_name"))
        if b is None:
            continue
        ax.annotate(
            "",
            xy=(x, y(s[metric])),
            xytext=(b["params"], y(b[metric])),
            arrowprops={"arrowstyle": "->", "color": "C0", "lw": 1.2, "shrinkA": 4, "shrinkB": 4},
            zorder=2,
        )
        g = _fmt(metric, "gain", gain(metric, s[metric], b[metric]))
        mid = (y(s[metric]) + y(b[metric])) / 2 if acc else math.sqrt(y(s[metric]) * y(b[metric]))
        ax.annotate(g, (x, mid), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8, color="C0")
    if base:
        ax.scatter(
            [b["params"] for b in base.values()],
            [y(b[metric]) for b in base.values()],
            s=45,
            facecolors="white",
            edgecolors="0.3",
            linewidths=1.3,
            zorder=3,
            label="hard-label baseline",
        )
        for name, b in base.items():
            ax.annotate(
                name,
                (b["params"], y(b[metric])),
                xytext=(0, -13),
                textcoords="offset points",
                ha="center",
                fontsize=8,
                color="0.25",
            )
    if distilled:
        ax.scatter(
            xs, [y(s[metric]) for s in distilled], s=45, color="C0", zorder=4, label="distilled from stored labels"
        )
    vals = [y(s[metric]) for s in students] + [y(t[metric])]
    lo, hi = min(vals), max(vals)
    if acc:
        ax.set_ylim(lo - 0.15 * (hi - lo) - 0.5, hi + 0.12 * (hi - lo) + 0.5)
    else:
        ax.set_yscale("log")
        ax.set_ylim(lo / 1.3, hi * 1.3)
    ax.set_xscale("log")
    params = [s["params"] for s in students] + xs
    ax.set_xlim(min(params) / 1.5, max(params) * 1.5)
    # ticks at the students' own sizes, e.g. 25.4K
    ax.set_xticks(sorted({s["params"] for s in students}))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: millions(v) if v >= 1e3 else f"{v:g}"))
    value = f"{y(t[metric]):.1f}{'%' if acc else ''}"
    ax.text(
        0.01,
        y(t[metric]),
        f" teacher ({t['name']}, {millions(t['params'])} params): {value}",
        transform=ax.get_yaxis_transform(),
        va="bottom",
        fontsize=8,
        color="0.25",
    )
    ax.set_xlabel("student parameters (log scale)")
    ev = report.get("eval_split", "test")
    ax.set_ylabel(f"{ev} accuracy (%)" if acc else f"{ev} perplexity (log scale, lower is better)")
    d = report.get("data") or {}
    sub = ""
    if acc and d and d["label_split"] != d["labelled_split"]:
        sub = f"\n{d['labelled']:,} labelled images; {d['label_samples']:,} unlabelled, labelled by the teacher"
    ax.set_title(f"{report['name']}: distilled students vs hard-label baselines{sub}", fontsize=9)
    ax.grid(True, which="major", color="0.9", lw=0.8)
    ax.legend(loc="lower right" if acc else "upper right", fontsize=8, framealpha=0.9)
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
    what = "accuracy" if report.get("metric", "accuracy") == "accuracy" else "perplexity"
    return "\n".join([f"# {report['name']}: {what} vs parameters", "", "```", report_table(report), "```"])
