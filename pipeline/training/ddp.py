"""Distributed student training from stored soft labels: a torchrun entry point.

    torchrun --nproc_per_node=4 -m pipeline.training.ddp --soft-labels runs/labels \\
        --dataset mnist5k --split '{"train": 4000, "val": 1000}' \\
        --arch '{"arch": "mlp", "kwargs": {"width": 128}}' --epochs 10 --out runs/student

Each rank streams its own partition of the stored labels (StoredLabelStream with
rank/world_size); DistributedDataParallel averages gradients; rank 0 evaluates, logs
and checkpoints. Without torchrun (no WORLD_SIZE > 1 in the environment) it runs as a
single process. Backend: nccl when training on CUDA, gloo on CPU.

Writes into --out: metrics.jsonl, train_state.pt (resume with --resume), student.pt
(pipeline/models/checkpoint.py format), result.json. --record-ids DIR makes every rank append
one JSON line per batch ({"epoch", "sample_id", "weight"}) to DIR/rank<r>.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from pipeline.data.datasets import load_dataset, split_dataset
from pipeline.training.student import run_student, student_lineage
from pipeline.training.loop import TrainConfig
from pipeline.views.transforms import transform_from_dict


def _json(s: str | None, what: str):
    if s is None:
        return None
    try:
        return json.loads(s)
    except ValueError as e:
        raise SystemExit(f"--{what}: not valid JSON ({e}): {s!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.training.ddp", description=__doc__.split("\n\n")[0])
    p.add_argument("--soft-labels", required=True, help="URI of a complete soft-label dataset")
    p.add_argument("--dataset", help="'mnist5k', 'digits' or a .npz/.parquet path")
    p.add_argument("--source", help='JSON streamed source spec (pipeline/data/sources.py), e.g. {"kind": "parquet", '
                                    '"path": "t.parquet", "text_column": "text", "label_column": "y"}')
    p.add_argument("--tokenizer", help="tokenizer directory (or pkg:<module>/<dir>) for a text source")
    p.add_argument("--max-length", type=int, default=128, help="token truncation for a text source")
    p.add_argument("--split", help='JSON sizes for split_dataset, e.g. {"train": 4000, "val": 1000}')
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--arch", required=True, help='JSON model spec, e.g. {"arch": "mlp", "kwargs": {}}')
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", help="JSON TrainConfig overrides (lr, loss, temperature, ...)")
    p.add_argument("--view-spec", help="JSON view transform (default: the transform stored with the labels)")
    p.add_argument("--storage-options", help="JSON fsspec storage options")
    p.add_argument("--expect", help="JSON manifest fields the labels must have")
    p.add_argument("--record-ids", help="directory for per-rank batch logs")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, help="torch.set_num_threads per process")
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    a = parse_args(argv)
    if (a.dataset is None) == (a.source is None):
        raise SystemExit("give exactly one of --dataset and --source")
    if a.threads:
        torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    overrides = _json(a.config, "config") or {}
    cfg = TrainConfig(**{"epochs": a.epochs, "log_path": os.path.join(a.out, "metrics.jsonl"),
                         "ckpt_path": os.path.join(a.out, "train_state.pt"), **overrides})

    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    if distributed:
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        rank = dist.get_rank() if distributed else 0
        if a.source is not None:
            from pipeline.data.sources import open_table_source
            ds = open_table_source(_json(a.source, "source"), tokenizer_path=a.tokenizer, max_length=a.max_length)
            if ds.y is not None and (ds.y < 0).any():
                ds = ds.labeled()   # as the flows do: rows without a label are dropped before splitting
        else:
            ds = load_dataset(a.dataset)
        val = None
        if a.split:
            parts = split_dataset(ds, seed=a.split_seed, sizes=_json(a.split, "split"))
            if a.train_split not in parts:
                raise SystemExit(f"--train-split {a.train_split!r} is not in --split {sorted(parts)}")
            ds, val = parts[a.train_split], parts.get(a.val_split)
        spec = _json(a.view_spec, "view-spec")
        arch = _json(a.arch, "arch")
        so = _json(a.storage_options, "storage-options")
        from storage import open_soft_labels
        m = open_soft_labels(a.soft_labels, storage_options=so).manifest
        vs = transform_from_dict(spec) if spec is not None else None
        split = {"dataset": a.dataset or _json(a.source, "source"), "sizes": _json(a.split, "split"), "seed": a.split_seed,
                 "train_split": a.train_split, "val_split": a.val_split}
        data = {"train": ds.fingerprint(), **({"val": val.fingerprint()} if val is not None else {})}
        lineage = student_lineage(data=data, split=split, views=spec, model=arch, train_config=cfg, mode="stored",
                                  teacher_fingerprint=(m.get("teacher") or {}).get("fingerprint"),
                                  label_manifests=[m])

        on_batch = None
        if a.record_ids:  # each rank appends the (sample_id, view) it trains on, per epoch
            os.makedirs(a.record_ids, exist_ok=True)
            rec_path = os.path.join(a.record_ids, f"rank{rank}.jsonl")
            open(rec_path, "w").close()

            def on_batch(epoch, batch):
                with open(rec_path, "a") as f:
                    f.write(json.dumps({"epoch": epoch, "sample_id": batch["sample_id"].tolist(),
                                        "view": batch["view"].tolist(), "weight": batch["weight"].tolist()}) + "\n")

        # the student recipe the flows use: same training, same checkpoint metadata
        run = {"name": os.path.basename(os.path.normpath(a.out)) or "student", "model": arch, "mode": "stored",
               **{k: getattr(cfg, k) for k in ("temperature", "alpha", "loss")}}
        r = run_student(run=run, train_config=cfg, transfer=ds, labelled=ds, val=val,
                        checkpoint_path=os.path.join(a.out, "student.pt"), soft_labels=[a.soft_labels],
                        label_manifests=[m], teacher=m.get("teacher"), view_spec=vs, num_views=m["num_views"],
                        storage_options=so, expect=_json(a.expect, "expect"), lineage=lineage, resume=a.resume,
                        on_batch=on_batch, world_size=world)
        result = r.train
        if rank == 0:
            with open(os.path.join(a.out, "result.json"), "w") as f:
                json.dump(result, f, indent=1)
        if distributed:
            # ranks leave together: a gloo rank that tears its group down while a peer is
            # still evaluating can abort ("terminate called without an active exception",
            # seen once under load). Not on the error path, where a barrier could hang.
            dist.barrier()
        return result
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
