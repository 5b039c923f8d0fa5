"""A student pruned from the teacher: how much of the way back to the teacher do the stored
labels take it, over CE alone with equal steps (issue 20's number).

configs/lm-pruned.yaml's pruned student (10 of SmolLM2-135M's 30 layers with their weights,
trained by Hugging Face Trainer with the recipe's settings), per seed and per choice of
layers (--inits: `bi`, the recipe's 10 layers of largest block influence; `every3`, layers
0, 3, ..., 24 and the last), three ways on the same 64 KJV windows: next-token CE only,
top-k KD and sampled KD alone (α = 0, the stored labels of one teacher pass). A seed sets the data order
(the pruned weights are the same every seed). Reported per seed: held-out test perplexity,
and the share of the CE twin's gap to the teacher that KD closes,
(ppl_CE − ppl_KD) / (ppl_CE − ppl_teacher).
Target: ≥ 50% closed by stored-label KD on every seed.

    python benchmarks/pruned_kd.py [--seeds 0 1 2] [--inits bi every3] [-- key=value overrides]
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
INITS = {"bi": None, "every3": [0, 3, 6, 9, 12, 15, 18, 21, 24, 29]}  # bi: the recipe's own layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "lm-pruned.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--inits", nargs="+", choices=sorted(INITS), default=["bi"])
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    runs_dir = tempfile.mkdtemp(prefix="distillery-pruned-kd-")
    os.chdir(ROOT)  # the config's relative paths (.assets/)
    cfg = load_config(a.config, [f"runs_dir={runs_dir}", f"students.seeds={a.seeds}", *a.overrides])
    base = next(m for m in cfg.students.models if m.arch == "pruned")  # the pruned student only
    cfg.students.models = [
        base.model_copy(
            update={
                "name": f"pruned-10L-{init}",
                "kwargs": base.kwargs | ({"keep_layers": INITS[init]} if INITS[init] else {}),
            }
        )
        for init in a.inits
    ]
    t0 = time.perf_counter()
    teacher = recipes.ensure_teacher(cfg)
    for p in recipes.plan_labels(cfg, teacher)["pending"]:
        recipes.label_one_shard(cfg, teacher, p["shard"])
    recipes.finalize_labels(cfg, teacher)
    t_ppl = recipes.task_recipes(cfg).teacher_evaluation(cfg, teacher)["perplexity"]
    print(f"labelled in {time.perf_counter() - t0:.0f}s; teacher test perplexity {t_ppl:.2f}", flush=True)
    results = []
    for run in recipes.student_runs(cfg):
        r = recipes.train_student(cfg, teacher, run)
        print(
            f"  {r['name']:<44} test ppl {r['perplexity']:9.2f} (start {r.get('initial', float('nan')):,.0f}; "
            f"{r['steps']} steps, {r['throughput']:,.0f} tokens/s, {r['train_seconds']:.0f}s)",
            flush=True,
        )
        results.append(r)
    report = recipes.build_report(cfg, teacher, results)
    print()
    print(report_table(report))
    print("\nper seed: test perplexity (share of the CE twin's gap to the teacher closed)")
    rows = report["rows"]
    print(f"{'student':<44}" + "".join(f"{'seed ' + str(s):>20}" for s in a.seeds))
    ok = True
    for r in rows:
        closed = r.get("closed_per_seed") or [None] * len(r["per_seed"])
        cells = [
            f"{v:9.1f}" + (f" ({100 * c:4.0f}%)" if c is not None else " " * 8) for v, c in zip(r["per_seed"], closed)
        ]
        print(f"{r['name']:<44}" + "".join(f"{c:>20}" for c in cells))
        if r["loss"] != "ce":
            ok &= all(c >= a.target for c in closed)
    means = [statistics.fmean(r["closed_per_seed"]) for r in rows if r.get("closed_per_seed")]
    print(
        f"\ntarget: KD closes >= {100 * a.target:.0f}% of the gap on every seed: {'PASS' if ok else 'FAIL'} "
        f"(mean closed {', '.join(f'{100 * m:.0f}%' for m in means)}; total {time.perf_counter() - t0:.0f}s)"
    )


if __name__ == "__main__":
    main()
