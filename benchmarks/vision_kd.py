"""configs/vision.yaml over seeds: does every student distilled from the stored labels beat
the same architecture trained on the labelled images alone, with the same views and as many
optimizer steps (issue 21's number)?

The recipe once: the timm ResNet teacher trains on the 500 labelled Animal-MNIST images and
labels the 4,000 unlabelled ones x 6 torchvision views; then each student (timm
mobilenetv3_small_050, torchvision mobilenet_v3_small) trains per seed (its init and data
order) from the stored labels and, as the baseline, from the 500 hard labels. Reported per
seed: test accuracy and the gain in points. Target: every distilled student >= 2 points over
its baseline on average and on every seed.

    python benchmarks/vision_kd.py [--seeds 0 1 2] [-- key=value overrides]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flows import recipes  # noqa: E402
from flows.config import load_config  # noqa: E402
from flows.report import report_table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "vision.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--target", type=float, default=0.02, help="points of accuracy (a fraction)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    os.chdir(ROOT)  # the config's relative paths (.assets/)
    runs_dir = tempfile.mkdtemp(prefix="distillery-vision-kd-")
    cfg = load_config(a.config, [f"runs_dir={runs_dir}", f"students.seeds={a.seeds}", *a.overrides])
    t0 = time.perf_counter()
    teacher = recipes.ensure_teacher(cfg)
    for p in recipes.plan_labels(cfg, teacher)["pending"]:
        recipes.label_one_shard(cfg, teacher, p["shard"])
    recipes.finalize_labels(cfg, teacher)
    print(f"teacher trained and labels stored in {time.perf_counter() - t0:.0f}s", flush=True)
    results = []
    for run in recipes.student_runs(cfg):
        r = recipes.train_student(cfg, teacher, run)
        print(f"  {r['name']:<40} acc {r['accuracy']:.4f} ({r['steps']} steps, {r['train_seconds']:.0f}s)", flush=True)
        results.append(r)
    report = recipes.build_report(cfg, teacher, results)
    print()
    print(report_table(report))
    print("\nper seed: test accuracy (gain over the baseline, points)")
    rows = report["rows"]
    print(f"{'student':<40}" + "".join(f"{'seed ' + str(s):>18}" for s in a.seeds))
    ok = True
    for r in rows:
        gains = r.get("gain_per_seed") or [None] * len(r["per_seed"])
        cells = [
            f"{v:.4f}" + (f" ({100 * g:+5.1f})" if g is not None else " " * 8) for v, g in zip(r["per_seed"], gains)
        ]
        print(f"{r['name']:<40}" + "".join(f"{c:>18}" for c in cells))
        if r["loss"] != "ce":
            ok &= all(g >= a.target for g in gains) and statistics.fmean(gains) >= a.target
    means = [f"{r['name']} {100 * statistics.fmean(r['gain_per_seed']):+.1f}" for r in rows if r["loss"] != "ce"]
    print(
        f"\ntarget: every distilled student >= {100 * a.target:.0f} points over its baseline on every seed and on "
        f"average: {'PASS' if ok else 'FAIL'} (mean gains: {'; '.join(means)}; total {time.perf_counter() - t0:.0f}s)"
    )


if __name__ == "__main__":
    main()
