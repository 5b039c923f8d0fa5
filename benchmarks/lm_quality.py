"""Language-model distillation quality: configs/lm.yaml's students over several seeds.

The recipe `distill run configs/lm.yaml` runs (flows/recipes.py, without Prefect): the
SmolLM2-135M teacher labels the train windows of the KJV corpus ONCE into top-32 (uint8)
and sampled (64 draws) datasets; then, per seed, three students of the same architecture
train with the same number of optimizer steps on the same windows:
  ce          next-token cross-entropy on the corpus only (no teacher)
  topk_kl     forward KL to the stored top-k + exact tail bucket
  sampled_kl  the sampled estimator (Anshumann et al. 2025) from the stored draws
A seed sets the student's initialisation and its data order; the corpus split and the
labels are shared. Each student keeps its best-validation weights; reported: perplexity
on the held-out split the report scores (`test` when the corpus has one, as configs/lm.yaml
does), mean ± std over seeds, and the change against the CE-only student.
Target (issue 11): both KD students reach a lower mean held-out perplexity than CE.

    python benchmarks/lm_quality.py [--seeds 0 1 2] [key=value overrides of configs/lm.yaml]
"""

from __future__ import annotations

import argparse
import os
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
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "lm.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    runs_dir = tempfile.mkdtemp(prefix="distillery-lm-quality-")
    over = [f"runs_dir={runs_dir}", f"students.seeds={a.seeds}", *a.overrides]
    os.chdir(ROOT)  # the config's relative paths (.assets/)
    cfg = load_config(a.config, over)
    t0 = time.perf_counter()
    teacher = recipes.ensure_teacher(cfg)
    for p in recipes.plan_labels(cfg, teacher)["pending"]:
        recipes.label_one_shard(cfg, teacher, p["shard"])
    recipes.finalize_labels(cfg, teacher)
    # the report's teacher entry (cached in the run directory: build_report reuses it)
    t_eval = recipes.task_recipes(cfg).teacher_evaluation(cfg, teacher)
    split = "test" if "test" in cfg.corpus.sizes else "val"
    print(
        f"labelled in {time.perf_counter() - t0:.0f}s; teacher {split} perplexity {t_eval['perplexity']:.2f}",
        flush=True,
    )
    results = []
    for run in recipes.student_runs(cfg):
        r = recipes.train_student(cfg, teacher, run)
        print(
            f"  {r['name']:<28} {split} ppl {r['perplexity']:8.2f}  ({r['steps']} steps, "
            f"{r['throughput']:,.0f} tokens/s, {r['train_seconds']:.0f}s)",
            flush=True,
        )
        results.append(r)
    report = recipes.build_report(cfg, teacher, results)
    print()
    print(report_table(report))
    rows = {r["loss"]: r for r in report["rows"]}
    ce = rows["ce"]["perplexity"]
    ok = all(rows[k]["perplexity"] < ce for k in ("topk_kl", "sampled_kl") if k in rows)
    print(
        f"\ntarget: every KD student's mean {split} perplexity below the CE-only student's ({ce:.1f}): "
        f"{'PASS' if ok else 'FAIL'}  (total {time.perf_counter() - t0:.0f}s)"
    )


if __name__ == "__main__":
    main()
