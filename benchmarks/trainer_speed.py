"""Hugging Face Trainer on stored token labels: what the labels cost on top of CE, and
whether the public dataset keeps up with a student (issue 20's numbers).

configs/lm.yaml's labels (SmolLM2-135M over 256 KJV windows of 128 tokens, top-32 + 64
sampled draws; labelled once into the benchmark's own run directory unless --runs-dir
names one that has them). Side by side in one process, same student initialisation, same
seed, so the same batches in the same order:
  1. Trainer steps/s of one student (llama-2x128, the recipe's scratch student; --student
     pruned: 10 of the teacher's 30 layers), next-token CE only (Windows) vs top-k KD and
     sampled KD at α = 0.5 and 0 (TokenLabels: the map-style dataset + collate_tokens,
     the Objective's loss). Target: KD tokens/s ≥ 0.85 × CE tokens/s.
  2. The public dataset alone (DataLoader(TokenLabels, shuffle, collate_tokens)) with 0
     and 2 workers: tokens/s vs the student's KD training tokens/s. Target: ≥ 10×.

    python benchmarks/trainer_speed.py [--steps 24] [--student llama|pruned] [--runs-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

import distillery  # noqa: E402
from flows import recipes  # noqa: E402
from flows.config import load_config  # noqa: E402
from pipeline.models.registry import build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StepClock(TrainerCallback):
    """Wall time of the steps after the first `skip` (warm-up: allocator, first batch)."""

    def __init__(self, skip: int):
        self.skip, self.t0, self.steps = skip, None, 0

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.skip:
            self.t0 = time.perf_counter()
        elif state.global_step > self.skip:
            self.steps += 1

    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def trainer_tokens_per_s(model, data, labels, loss, alpha, steps, batch, skip=2) -> float:
    clock = StepClock(skip)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="distillery-trainer-speed-"),
        per_device_train_batch_size=batch,
        max_steps=steps + skip,
        learning_rate=1e-4,
        seed=0,
        data_seed=0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    tr = distillery.DistillationTrainer(
        model=model, args=args, train_dataset=data, labels=labels, loss=loss, alpha=alpha, callbacks=[clock]
    )
    tr.train()
    tokens_per_step = batch * data.corpus.seq_len  # full windows (packed corpus)
    return clock.steps * tokens_per_step / clock.seconds()


def dataset_tokens_per_s(data, batch: int, workers: int) -> float:
    loader = DataLoader(
        data,
        batch_size=batch,
        shuffle=True,
        collate_fn=distillery.collate_tokens,
        num_workers=workers,
        multiprocessing_context="forkserver" if workers else None,
        persistent_workers=bool(workers),
    )
    for _ in loader:  # one epoch to start the workers and warm the caches
        pass
    t0, tokens = time.perf_counter(), 0
    for _ in range(2):
        for b in loader:
            tokens += int(b["mask"].sum())
    return tokens / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--student", choices=["llama", "pruned"], default="llama")
    ap.add_argument("--runs-dir", default=None)
    a = ap.parse_args()
    os.chdir(ROOT)
    runs = a.runs_dir or tempfile.mkdtemp(prefix="distillery-trainer-speed-")
    cfg = load_config(os.path.join(ROOT, "configs", "lm.yaml"), [f"runs_dir={runs}"])
    teacher = recipes.ensure_teacher(cfg)
    for p in recipes.plan_labels(cfg, teacher)["pending"]:
        recipes.label_one_shard(cfg, teacher, p["shard"])
    recipes.finalize_labels(cfg, teacher)
    uris = cfg.label_uris()
    topk, sampled = distillery.open_labels(uris["topk"]), distillery.open_labels(uris["sampled"])
    corpus = recipes.lm.splits(cfg)["train"]
    V = topk.manifest["vocab_size"]
    torch.manual_seed(0)
    if a.student == "llama":
        spec = {"arch": "llama", "kwargs": {"layers": 2, "hidden": 128, "heads": 4, "max_length": corpus.seq_len}}
        student = build_model(spec, in_shape=(corpus.seq_len,), num_classes=V).model
    else:
        from pipeline.models.pruning import pruned

        student = pruned(teacher=teacher["dir"], num_classes=V, keep_layers=[0, 3, 6, 9, 12, 15, 18, 21, 24, 29]).model
    params = sum(p.numel() for p in student.parameters())
    print(
        f"student {a.student} ({params / 1e6:.1f}M params), {a.steps} timed steps of {a.batch} x "
        f"{corpus.seq_len} tokens, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    runs_ = [
        ("ce (Windows)", distillery.Windows(corpus), None, "ce", 0.0),
        ("topk_kl a=0.5", distillery.TokenLabels(topk, corpus), topk, "topk_kl", 0.5),
        ("topk_kl a=0", distillery.TokenLabels(topk, corpus), topk, "topk_kl", 0.0),
        ("sampled_kl a=0.5", distillery.TokenLabels(sampled, corpus), sampled, "sampled_kl", 0.5),
        ("sampled_kl a=0", distillery.TokenLabels(sampled, corpus), sampled, "sampled_kl", 0.0),
    ]
    tps = {}
    for name, data, labels, loss, alpha in runs_:
        tps[name] = trainer_tokens_per_s(copy.deepcopy(student), data, labels, loss, alpha, a.steps, a.batch)
        print(f"  Trainer {name:<18} {tps[name]:9,.0f} tokens/s", flush=True)
    ce = tps["ce (Windows)"]
    print("\nKD vs CE, same student, same batches (target >= 0.85):")
    ok1 = True
    for name in list(tps)[1:]:
        r = tps[name] / ce
        ok1 &= r >= 0.85
        print(f"  {name:<18} {r:5.2f}x")
    kd = min(tps[n] for n in list(tps)[1:])
    print("\nthe public dataset alone (DataLoader(TokenLabels, shuffle, collate_tokens)), vs the slowest KD student:")
    ok2 = True
    for labels, name in ((topk, "topk"), (sampled, "sampled")):
        for w in (0, 2):
            d = dataset_tokens_per_s(distillery.TokenLabels(labels, corpus), a.batch, w)
            ok2 &= d >= 10 * kd
            print(f"  {name:<8} workers={w}  {d:11,.0f} tokens/s = {d / kd:6.1f}x the student")
    verdict = {True: "PASS", False: "FAIL"}
    print(f"\ntargets: KD >= 0.85x CE: {verdict[ok1]}; dataset >= 10x the student: {verdict[ok2]}")


if __name__ == "__main__":
    main()
