"""Language-model distillation quality: configs/lm.yaml's students over several seeds.

The recipe `distill run configs/lm.yaml` runs (flows/lm_recipes.py, without Prefect): the
SmolLM2-135M teacher labels the train windows of the KJV corpus ONCE into top-32 (uint8)
and sampled (64 draws) datasets; then, per seed, three students of the same architecture
train with the same number of optimizer steps on the same windows:
  ce          next-token cross-entropy on the corpus only (no teacher)
  topk_kl     forward KL to the stored top-k + exact tail bucket
  sampled_kl  the sampled estimator (Anshumann et al. 2025) from the stored draws
A seed sets the student's initialisation and its data order; the corpus split and the
labels are shared. Reported: validation perplexity (held-out windows), mean ± std over
seeds, and the change against the CE-only student.
Target (issue 11): both KD students reach a lower mean validation perplexity than CE.

    python benchmarks/lm_quality.py [--seeds 0 1 2] [key=value overrides of configs/lm.yaml]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flows import lm_recipes  # noqa: E402
from flows.lm_config import load_lm_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "lm.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    runs_dir = tempfile.mkdtemp(prefix="distillery-lm-quality-")
    over = [f"runs_dir={runs_dir}", f"students.seeds={a.seeds}", *a.overrides]
    os.chdir(ROOT)                          # the config's relative paths (.assets/)
    cfg = load_lm_config(a.config, over)
    t0 = time.perf_counter()
    teacher = lm_recipes.resolve_teacher(cfg)
    labels = lm_recipes.label(cfg, teacher)
    t_eval = lm_recipes.teacher_eval(cfg, teacher)
    print(f"labelled in {time.perf_counter() - t0:.0f}s; teacher validation perplexity {t_eval['perplexity']:.2f}",
          flush=True)
    results = []
    for run in lm_recipes.student_runs(cfg):
        r = lm_recipes.train_student(cfg, teacher, run)
        print(f"  {r['name']:<28} val ppl {r['val_perplexity']:8.2f}  ({r['steps']} steps, "
              f"{r['train_tokens_per_s']:,.0f} tokens/s, {r['seconds']:.0f}s)", flush=True)
        results.append(r)
    report = lm_recipes.build_report(cfg, teacher, labels, t_eval, results)
    print()
    print(lm_recipes.report_table(report))
    rows = {r["loss"]: r for r in report["rows"]}
    ce = rows["ce"]["val_perplexity"]
    ok = all(rows[k]["val_perplexity"] < ce for k in ("topk_kl", "sampled_kl") if k in rows)
    print(f"\ntarget: every KD student's mean validation perplexity below the CE-only student's ({ce:.1f}): "
          f"{'PASS' if ok else 'FAIL'}  (total {time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
