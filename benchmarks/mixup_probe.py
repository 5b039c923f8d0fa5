"""Probe (not a product path): do mixup views let stored KD beat hard labels on the same views?

distill_quality.py shows that on MNIST-5k with shift-only views, hard labels on the same
views (row C) do as well as stored soft labels (row D): the views do the work. Mixup makes
hard labels ambiguous, which is where a teacher's labels should help (Beyer et al. 2022,
"Knowledge distillation: A good teacher is patient and consistent"). This probe builds V
views per sample in memory, each (for view > 0, with probability --pmix) a blend
lam * x_i + (1 - lam) * x_j with a random partner j and lam ~ U(0, 1), then shifted like
distill_quality's views; the teacher labels every view once. Two students train on the
same rows for the same steps: "hard" with mixed one-hot targets (lam * CE(y_i) +
(1 - lam) * CE(y_j)), "kd" with the teacher's logits (T = 4, alpha = 0).

    python benchmarks/mixup_probe.py --pmix 1.0 --seeds 0,1 --epochs 40
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distill_quality as dq  # noqa: E402

from pipeline.evaluate import accuracy, predict_logits  # noqa: E402
from pipeline.models.registry import build_model  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402
from pipeline.training.loop import make_optimizer, make_schedule  # noqa: E402
from pipeline.views.images import apply_views  # noqa: E402


def views(tr, teacher, V: int, pmix: float, seed: int = 123):
    """(N*V, ...) mixed+shifted inputs, teacher logits, the two labels and lam per row."""
    N, rng = len(tr), np.random.default_rng(seed)
    sid, view = np.repeat(np.arange(N), V), np.tile(np.arange(V), N)
    partner = rng.integers(0, N, N * V)
    lam = rng.uniform(0, 1, N * V).astype(np.float32)
    lam[~((rng.uniform(0, 1, N * V) < pmix) & (view > 0))] = 1.0  # view 0 and unmixed rows: the image
    X = np.empty((N * V,) + tr.x.shape[1:], np.float32)
    Z = np.empty((N * V, 10), np.float32)
    for a in range(0, N * V, 4096):
        b = min(a + 4096, N * V)
        lm = lam[a:b, None, None, None]
        x = torch.from_numpy(lm * tr.x[sid[a:b]] + (1 - lm) * tr.x[partner[a:b]])
        x = apply_views(x, tr.sample_ids[sid[a:b]], view[a:b], dq.VIEWS)
        X[a:b] = x.numpy()
        with torch.inference_mode():
            Z[a:b] = teacher(x).numpy()
    return X, Z, tr.y[sid], tr.y[partner], lam


def train_one(mode: str, seed: int, data, tr, epochs: int, T: float = 4.0, bs: int = 128) -> float:
    X, Z, y1, y2, lam = data
    n = len(X)
    torch.manual_seed(seed)
    m = build_model(dq.STUDENT_ARCH, in_shape=tr.in_shape, num_classes=10)
    cfg = TrainConfig(epochs=epochs, batch_size=bs, lr=3e-3, optimizer="adamw", schedule="cosine")
    opt = make_optimizer(m.parameters(), cfg)
    sched = make_schedule(opt, cfg, epochs * -(-n // bs))
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n)
        for a in range(0, n, bs):
            i = order[a : a + bs]
            out = m(torch.from_numpy(X[i]))
            if mode == "hard":
                lm = torch.from_numpy(lam[i])
                loss = (
                    lm * F.cross_entropy(out, torch.from_numpy(y1[i]), reduction="none")
                    + (1 - lm) * F.cross_entropy(out, torch.from_numpy(y2[i]), reduction="none")
                ).mean()
            else:
                t = torch.from_numpy(Z[i])
                loss = (
                    T
                    * T
                    * F.kl_div(
                        F.log_softmax(out / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean"
                    )
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    te = dq.splits()["test"]
    return accuracy(predict_logits(m, te.x), te.y)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pmix", type=float, default=1.0, help="probability that a view > 0 is a mixup blend")
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=10, help="passes over all N x V rows")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = tempfile.mkdtemp(prefix="distillery-mixup-")
    tr = dq.splits()["train"]
    args = argparse.Namespace(**{k: v for k, v in dq.DEFAULTS.items()})
    path, ti = dq.make_teacher(root, args)
    teacher, _ = dq.load_model(path)
    data = views(tr, teacher.eval(), a.views, a.pmix)
    print(
        f"teacher test {100 * ti['test']:.2f}%; {a.views} views/sample, pmix {a.pmix}, {a.epochs} epochs "
        f"({len(data[0]):,} rows each)"
    )
    for seed in (int(s) for s in a.seeds.split(",")):
        for mode in ("hard", "kd"):
            t0 = time.perf_counter()
            acc = train_one(mode, seed, data, tr, a.epochs)
            print(f"seed {seed} {mode:4s} test {100 * acc:.2f}%  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
