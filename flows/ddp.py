"""Students under torchrun/DDP: the config's sweep (or the students named) trained by the
very recipe the flows run (flows/recipes.py train_student), one process per rank.

    torchrun --nproc_per_node=2 -m flows.ddp configs/lm.yaml [key=value ...] [--student NAME ...]

Each rank streams its own partition of the stored labels (or of the baseline's rows);
DistributedDataParallel averages the gradients; rank 0 validates, checkpoints, evaluates
and exports, into the same files as `distill students` (runs/<name>/students/), so a
student trained here is reused, not retrained, by a later `distill students`, and a
killed torchrun resumes from its last checkpoint. Rank 0 writes <student>.result.json
beside it. The labels must exist (`distill label` first). Without torchrun (WORLD_SIZE
unset) it runs as one process. Backend: nccl when training on CUDA, gloo on CPU.
--record-ids DIR makes every rank append one JSON line per batch ({"epoch", "sample_id",
"view", "weight"}) to DIR/<student>.rank<r>.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from pipeline.device import resolve_device

from . import recipes
from .config import ConfigError, load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun -m flows.ddp", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument(
        "--student",
        action="append",
        default=[],
        metavar="NAME",
        help="train this student of the sweep (repeatable; default: every one)",
    )
    p.add_argument("--record-ids", metavar="DIR", help="per-rank batch logs (sample ids, views, weights)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads per process")
    args, rest = p.parse_known_args(argv)  # key=value words after an option are overrides too
    extra = [w for w in rest if "=" in w and not w.startswith("-")]
    if len(extra) < len(rest):
        p.error(f"unrecognized arguments: {' '.join(w for w in rest if w not in extra)}")
    args.overrides += extra
    return args


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        raise SystemExit(f"distill: {e}") from None
    if a.threads:
        torch.set_num_threads(a.threads)
    runs = recipes.student_runs(cfg)
    unknown = sorted(set(a.student) - {r["name"] for r in runs})
    if unknown:
        raise SystemExit(f"--student {unknown}: not in the sweep of {a.config} ({[r['name'] for r in runs]})")
    runs = [r for r in runs if not a.student or r["name"] in a.student]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        cuda = resolve_device(cfg.students.train.device).type == "cuda" if torch.cuda.is_available() else False
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        rank = dist.get_rank() if distributed else 0
        teacher = recipes.existing_teacher(cfg)
        recipes.check_labels(cfg)
        results = []
        for run in runs:
            result = recipes.train_student(cfg, teacher, run, on_batch=_recorder(a.record_ids, run["name"], rank))
            if rank == 0:
                path = cfg.run_dir() / "students" / f"{run['name']}.result.json"
                path.write_text(json.dumps(result, indent=1, default=str))
                print(f"{run['name']}: {json.dumps({k: result.get(k) for k in ('steps', 'epochs_run', 'best_val')})}")
            results.append(result)
        if distributed:
            # ranks leave together: a gloo rank that tears its group down while a peer is
            # still evaluating can abort ("terminate called without an active exception",
            # seen once under load). Not on the error path, where a barrier could hang.
            dist.barrier()
        return results
    finally:
        if distributed:
            dist.destroy_process_group()


def _recorder(folder: str | None, name: str, rank: int):
    if folder is None:
        return None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.rank{rank}.jsonl")
    open(path, "w").close()

    def on_batch(epoch, batch):
        with open(path, "a") as f:
            f.write(
                json.dumps(
                    {
                        "epoch": epoch,
                        "sample_id": batch["sample_id"].tolist(),
                        "view": batch["view"].tolist(),
                        "weight": batch["weight"].tolist(),
                    }
                )
                + "\n"
            )

    return on_batch


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
