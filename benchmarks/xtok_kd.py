"""Cross-tokenizer distillation from stored labels (issue 23): the three numbers.

    python benchmarks/xtok_kd.py              # after `distill run configs/lm-xtok.yaml`
    python benchmarks/xtok_kd.py --seeds 0 1 2 --skip-train   # tables from an existing report

1. bytes: the extra stored bytes per token of the alignment fields (the `target_logprob`
   column, compressed as stored, from the recipe's Parquet shards' metadata), against the
   8 B target, beside the whole label's bytes per token.
2. step cost: one training step of each student with its own tokenizer on the same batch,
   with every cross-tokenizer loss (the recipe's and the others): KD (the batch's alignment
   + forward + CE + KD loss + backward) against CE alone (forward + CE + backward),
   interleaved, median of the repeats; target ratio <= 1.3.
3. quality: the recipe's students over --seeds (default 0 1 2: `distill students` adds the
   missing seeds to the recipe's run, reusing its labels and finished students), held-out
   test bits per byte per seed: every cross-tokenizer KD student against its CE twin,
   and the share of the same-tokenizer KD gain (in bits per byte) each keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = os.path.join(ROOT, "configs", "lm-xtok.yaml")
RUNS: list[str] = []  # the recipe's own runs/ (run from the repository root); --runs-dir: another


def stored_bytes(uri: str) -> None:
    import pyarrow.parquet as pq

    import storage

    ds = storage.open_soft_labels(uri)
    tokens = int(ds.manifest["num_tokens"])
    per_col: dict[str, int] = {}
    total = 0
    for sh in ds.shards:
        md = pq.ParquetFile(os.path.join(uri, sh["path"])).metadata
        for rg in range(md.num_row_groups):
            g = md.row_group(rg)
            for c in range(g.num_columns):
                col = g.column(c)
                name = col.path_in_schema.split(".")[0]
                per_col[name] = per_col.get(name, 0) + col.total_compressed_size
        total += int(sh["bytes"])
    extra = per_col.get("target_logprob", 0) / tokens
    print(f"bytes: {tokens:,} labelled tokens at {uri}")
    print(f"  whole label (files): {total / tokens:.1f} B/token")
    for name, b in sorted(per_col.items(), key=lambda kv: -kv[1]):
        print(f"  column {name:<16} {b / tokens:6.2f} B/token (compressed)")
    print(f"  alignment fields: target_logprob {extra:.2f} B/token (+ one byte record in the manifest)")
    print(f"  target <= 8 B/token: {'PASS' if extra <= 8 else 'FAIL'}")


def step_cost(reps: int) -> list[float]:
    import torch

    from flows import lm
    from flows.config import load_config
    from pipeline.data.alignment import batch_alignment
    from pipeline.models.registry import complete_spec, model_adapter
    from pipeline.objectives.losses import LOSSES
    from pipeline.objectives.objective import Objective
    from pipeline.training.stream import open_label_stream

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = load_config(CONFIG, RUNS)
    uri = cfg.label_uris()["topk"]
    ratios = []
    print(f"\nstep cost: one step on the same batch (batch_size {cfg.students.train.batch_size}), median of {reps}")
    print(f"{'student':<14}{'loss':<11}{'CE ms':>9}{'KD ms':>9}{'align ms':>10}{'ratio':>8}")
    for m in cfg.student_models():
        if m.tokenizer is None:
            continue
        run = {"model": m.model_dump()}
        parts, _ = lm.student_splits(cfg, run)
        train = parts["train"]
        stream = open_label_stream(uri, train, batch_size=cfg.students.train.batch_size, seed=0)
        batch = next(iter(stream))
        arch = complete_spec({"arch": m.arch, "kwargs": m.kwargs}, train.model_args()).to_dict()
        torch.manual_seed(0)
        net = model_adapter(arch).build(train.in_shape, int(train.model_args()["vocab_size"]))
        sid = batch["sample_id"].numpy()
        Lt, Ls = batch["topk_ids"].shape[1], batch["x"].shape[1]
        for loss in [n for n, spec in LOSSES.items() if spec.cross_tokenizer]:  # every one, not only the recipe's
            ce = Objective(loss="ce")
            kd = Objective(loss=loss, alpha=0.5, kind="token_topk", stored_temperatures=[1.0])
            kd.maps = stream.maps

            def run_ce():
                net.zero_grad(set_to_none=True)
                ce(net, batch)["loss"].backward()

            def run_kd():
                net.zero_grad(set_to_none=True)
                batch_alignment(stream.teacher, train, sid, Lt, Ls)  # the alignment, part of the step
                kd(net, batch)["loss"].backward()

            for f in (run_ce, run_kd):  # warm-up
                f()
            t_ce, t_kd, t_al = [], [], []
            for _ in range(reps):
                for f, out in ((run_ce, t_ce), (run_kd, t_kd)):
                    t0 = time.perf_counter()
                    f()
                    out.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                batch_alignment(stream.teacher, train, sid, Lt, Ls)
                t_al.append(time.perf_counter() - t0)
            a, b, c = (statistics.median(x) * 1e3 for x in (t_ce, t_kd, t_al))
            ratios.append(b / a)
            print(f"{m.display_name():<14}{loss:<11}{a:9.1f}{b:9.1f}{c:10.2f}{b / a:8.2f}")
    print(f"  target ratio <= 1.3: {'PASS' if max(ratios) <= 1.3 else 'FAIL'} (largest {max(ratios):.2f})")
    return ratios


def quality(seeds: list[int], skip_train: bool) -> None:
    from flows.config import load_config

    cfg = load_config(CONFIG, RUNS)
    path = cfg.run_dir() / "report.json"
    have = {s["seed"] for s in json.loads(path.read_text())["students"]} if path.is_file() else set()
    todo = [x for x in seeds if x not in have]  # the recipe's own seed is in its report already
    if todo and not skip_train:
        cmd = [sys.executable, "-m", "flows.cli", "students", CONFIG, *RUNS, f"students.seeds={json.dumps(todo)}"]
        subprocess.run(cmd, check=True, cwd=ROOT, env=os.environ | {"DISTILL_PROGRESS": "0"})
    report = json.loads(path.read_text())
    t = report["teacher"]
    print(f"\nquality: test bits per byte, seeds {seeds} (teacher {t['name']}: {t['bits_per_byte']:.3f})")
    students = [s for s in report["students"] if s["seed"] in seeds]
    base = {(s["arch_name"], s["seed"]): s["bits_per_byte"] for s in students if s["loss"] == "ce"}
    kd = [s for s in students if s["loss"] != "ce"]
    same = [s for s in kd if s.get("tokenizer") is None]
    same_gain = statistics.fmean(base[(s["arch_name"], s["seed"])] - s["bits_per_byte"] for s in same) if same else None
    print(f"{'student':<34}" + "".join(f"{'seed ' + str(x):>16}" for x in seeds) + f"{'mean gain':>11}{'kept':>7}")
    ok = True
    for key in sorted({(s["arch_name"], s["loss"]) for s in kd}):
        rows = {s["seed"]: s for s in kd if (s["arch_name"], s["loss"]) == key}
        cells, gains = [], []
        for x in seeds:
            s = rows.get(x)
            if s is None:
                cells.append(f"{'-':>16}")
                continue
            b = base[(key[0], x)]
            gains.append(b - s["bits_per_byte"])
            cells.append(f"{s['bits_per_byte']:.3f} vs {b:.3f}".rjust(16))
            if s.get("tokenizer") is not None:
                ok &= s["bits_per_byte"] < b
        g = statistics.fmean(gains)
        own = next(iter(rows.values())).get("tokenizer") is not None
        kept = f"{g / same_gain:6.0%}" if same_gain and own else "     -"
        print(f"{key[0] + ' ' + key[1]:<34}" + "".join(cells) + f"{g:+11.3f} {kept}")
    print("  (each cell: the KD student's test bits/byte vs its CE twin's, same seed and steps)")
    print(f"  every cross-tokenizer KD student below its CE twin on every seed: {'PASS' if ok else 'FAIL'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-train", action="store_true", help="tables from the existing report.json")
    ap.add_argument("--only", choices=["bytes", "cost", "quality"])
    ap.add_argument("--runs-dir", help="where the recipe ran (default runs/)")
    a = ap.parse_args()
    os.chdir(ROOT)  # runs/ as `distill run configs/lm-xtok.yaml` from the root wrote it
    if a.runs_dir:
        RUNS.append(f"runs_dir={os.path.abspath(a.runs_dir)}")
    from flows.config import load_config

    cfg = load_config(CONFIG, RUNS)
    if a.only in (None, "bytes"):
        stored_bytes(cfg.label_uris()["topk"])
    if a.only in (None, "cost"):
        step_cost(a.reps)
    if a.only in (None, "quality"):
        quality(a.seeds, a.skip_train)


if __name__ == "__main__":
    main()
