"""flows/report.py: the CLI table (gain column, footnote), the students PNG and the
markdown artifact that inlines it. A report dict shaped like report.json, no training."""

import base64
import struct

from flows.report import aggregate, chart_data_url, chart_markdown, report_table, students_png, with_baselines


def _student(name, arch, mode, acc, params, steps, seed=0):
    loss = "ce" if mode == "hard" else "kd"
    return {
        "name": name,
        "arch_name": arch,
        "mode": mode,
        "loss": loss,
        "temperature": None if loss == "ce" else 4.0,
        "alpha": None if loss == "ce" else 0.0,
        "seed": seed,
        "accuracy": acc,
        "agreement": acc + 0.01,
        "params": params,
        "size_bytes": 4 * params,
        "latency_ms": 0.05,
        "steps": steps,
    }


def _report():
    students = []
    for arch, params, hard, kd in (("mlp-32", 25_418, 0.886, 0.919), ("mlp-64", 50_890, 0.894, 0.940)):
        students.append(_student(f"{arch}-baseline", arch, "hard", hard, params, 4128))
        students.append(_student(f"{arch}-T4-a0-kd", arch, "stored", kd, params, 4130))
    students = with_baselines(students, "accuracy", True)
    return {
        "name": "quickstart",
        "eval_split": "test",
        "metric": "accuracy",
        "students": students,
        "rows": aggregate(students, "accuracy"),
        "soft_labels": "/x",
        "teacher": {
            "name": "cnn-teacher",
            "accuracy": 0.955,
            "params": 20_490,
            "size_bytes": 87_000,
            "latency_ms": 0.2,
        },
        "data": {
            "labelled_split": "train",
            "labelled": 500,
            "label_split": "transfer",
            "label_samples": 3300,
            "views": 16,
        },
    }


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def test_table_shows_each_gain_and_says_what_the_baseline_saw():
    text = report_table(_report())
    lines = text.splitlines()
    assert lines[0].split()[-2:] == ["baseline", "gain"]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:7]}
    assert rows["mlp-32-T4-a0-kd"][-1] == "+3.30" and rows["mlp-64-T4-a0-kd"][-1] == "+4.60"
    assert rows["mlp-32-baseline"][-1] == "-"  # a baseline has no gain over itself
    assert "500 labelled `train` images" in text and "same 16 views" in text
    assert "4,128 vs 4,130 steps" in text and "3,300 unlabelled `transfer` images" in text
    # labels on the teacher's own training images: the footnote says so instead
    r = _report()
    r["data"].update(label_split="train", label_samples=500)
    assert "same 500 `train` images" in report_table(r) and "unlabelled" not in report_table(r)


def test_students_png_is_a_small_picture(tmp_path):
    png = students_png(_report())
    assert _png_size(png) == (600, 400) and len(png) < 100_000


def test_chart_is_the_png_as_a_data_url_and_the_markdown_keeps_the_table(tmp_path):
    r = _report()
    path = tmp_path / "students.png"
    path.write_bytes(students_png(r))
    r["chart"] = str(path)
    url = chart_data_url(r)
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == path.read_bytes() and len(url) < 100_000
    md = chart_markdown(r)
    assert "mlp-64-T4-a0-kd" in md and "+4.60" in md and "data:image" not in md
    # no PNG (an older report.json): no picture, the table alone
    r["chart"] = str(tmp_path / "missing.png")
    assert chart_data_url(r) is None and "mlp-64-T4-a0-kd" in chart_markdown(r)


def test_rows_over_seeds_give_mean_std_and_per_seed_gains_for_both_metrics(tmp_path):
    """Three seeds: each student against its own seed's baseline; the row is the mean ± std,
    report.md lists every seed. Perplexity: lower is better, the gain a relative change."""
    from flows.report import report_markdown

    students = []
    for seed, (base, kd) in enumerate(((200.0, 150.0), (210.0, 147.0), (190.0, 152.0))):
        for name, mode, ppl in (("s-baseline", "hard", base), ("s-T1-a0.5-topk_kl", "stored", kd)):
            r = _student(name, "s", mode, 0.0, 6_800_000, 256, seed=seed)
            r.pop("accuracy")
            r.update(
                perplexity=ppl,
                loss="ce" if mode == "hard" else "topk_kl",
                temperature=None if mode == "hard" else 1.0,
                alpha=None if mode == "hard" else 0.5,
            )
            students.append(r)
    students = with_baselines(students, "perplexity", False)
    assert [s["gain"] for s in students if s["loss"] != "ce"] == [150 / 200 - 1, 147 / 210 - 1, 152 / 190 - 1]
    rows = aggregate(students, "perplexity")
    kd = next(r for r in rows if r["loss"] == "topk_kl")
    assert kd["perplexity"] == 149.66666666666666 and kd["seeds"] == [0, 1, 2]
    assert abs(kd["perplexity_std"] - 2.5166114784235836) < 1e-12
    assert abs(kd["gain"] - ((150 / 200 + 147 / 210 + 152 / 190) / 3 - 1)) < 1e-12
    report = {
        "name": "lm",
        "metric": "perplexity",
        "students": students,
        "rows": rows,
        "soft_labels": "/x",
        "teacher": {"name": "smol", "perplexity": 20.0, "params": 134_500_000},
    }
    lines = report_table(report).splitlines()
    assert lines[0].split() == ["name", "ppl", "params", "steps", "baseline", "gain"]
    row = next(ln.split() for ln in lines if ln.startswith("s-T1-a0.5-topk_kl"))
    assert row[1] == "149.7±2.5" and row[-1] == "-25%" and row[-2] == "200.0"
    md = report_markdown(report)
    assert "| s-T1-a0.5-topk_kl | 150.0 (-25%) | 147.0 (-30%) | 152.0 (-20%) | 149.7 |" in md
    png = students_png(report)
    assert _png_size(png) == (600, 400)
