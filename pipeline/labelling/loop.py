"""The teacher's one pass, for every task: plan, resume, label shards, finalize.

    labeller = ClassifyLabeller(model, inputs, ...)      # or TokenLabeller: the task's part
    run = LabelRun(labeller, shard_size=1000, teacher=teacher_info)
    for i in run.pending():                              # one Prefect task each, or in line
        run.label_shard(i)
    manifests = run.finalize()

A labeller (the task's part) names its output datasets (the writer arguments of each:
a classifier's dense or top-k labels; a language model's top-k and sampled token labels,
several from ONE forward) and runs the teacher over a shard's samples [a, b), returning
the columns of each output that lacks the shard. Everything else is here, once:

  * the plan: shard i holds samples [i*S, (i+1)*S) of the inputs' row order (plan_shards),
    every row of a sample (its views, its window's tokens) in the same shard;
  * resume: each output is its own resumable dataset; a shard is recomputed only when
    some output lacks it, and written only to those (a re-run on a complete dataset runs
    no teacher at all); a resumed run must plan the same shards (check_plan);
  * the store overlaps the next forward on an accelerator (one write in flight);
  * finalize: every output's manifest, unless a concurrent run already wrote exactly
    the committed shards.
Per-shard Prefect tasks each build their own LabelRun (re-opening a writer with the same
identity resumes, never wipes), so shards run on any worker or Dask cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

import storage


class Labeller(Protocol):
    """The task's part of labelling (see the module docstring)."""

    inputs: object  # a pipeline.data Source: len(), sample_ids, name
    device: object  # the torch.device the teacher runs on

    def outputs(self) -> list[dict]:
        """SoftLabelWriter keyword arguments of each output dataset (uri, backend,
        representation and its parameters), teacher and data excepted."""

    def rows_per_sample(self) -> np.ndarray | int | None:
        """Stored rows per sample: its views, or its window's tokens (one per sample); None
        when only the teacher decides (the tokens it writes)."""

    def data(self) -> dict:
        """The manifest's data entry: name, split, fingerprint, transform, inputs, ..."""

    def shard(self, start: int, stop: int, outputs: list[int]) -> list[dict]:
        """write_shard keyword arguments of samples [start, stop) for each output in `outputs`."""


def plan_shards(num_samples: int, *, shard_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] sample ranges of at most shard_size samples covering [0, num_samples)."""
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    return [(a, min(a + shard_size, num_samples)) for a in range(0, int(num_samples), int(shard_size))]


def check_plan(
    writer: storage.SoftLabelWriter,
    plan: list[tuple[int, int]],
    sample_ids: np.ndarray,
    rows_per_sample: np.ndarray | int,
    commits: dict[int, dict],
) -> None:
    """A resumed run must cut shards exactly like the run that committed them (`commits`:
    the writer's records of the shards this run looks at). A sample is `rows_per_sample`
    stored rows (its views, or its window's tokens: an array, one length per sample, when
    windows differ in length; None: unknown before labelling, only the ids are compared)."""
    rows = (
        None if rows_per_sample is None else np.broadcast_to(np.asarray(rows_per_sample, np.int64), (len(sample_ids),))
    )
    planned = writer.manifest.get("planned_shards")
    if planned is not None and planned != len(plan):
        raise ValueError(
            f"{writer.uri} was started with {planned} shards but this run plans {len(plan)}; "
            f"use the same shard_size and data, or overwrite=True"
        )
    for i, rec in commits.items():
        a, b = plan[i] if i < len(plan) else (0, 0)
        want = (int(rows[a:b].sum()) if rows is not None else None, int(sample_ids[a]), int(sample_ids[b - 1]))
        want = want if b > a else None
        got = (rec["num_rows"] if rows is not None else None, rec["first_sample_id"], rec["last_sample_id"])
        if want != got:
            raise ValueError(
                f"{writer.uri}: committed shard {i} holds (rows, first id, last id) = {got}, "
                f"this run's plan expects {want}; use the same shard_size, or overwrite=True"
            )


class LabelRun:
    """One labelling run over a labeller's outputs (see the module docstring)."""

    def __init__(
        self,
        labeller: Labeller,
        *,
        shard_size: int,
        teacher: dict,
        storage_options: dict | None = None,
        overwrite: bool = False,
        shards: list[int] | None = None,
        signing_key: str | bytes | None = None,
    ):
        """shards=None: the whole run (every output's commit records listed once); a list:
        a run over those shards only (a per-shard task), which reads only their records,
        so its cost does not grow with the number of shards. signing_key: sign every output
        (an Ed25519 private key, storage/signing.py)."""
        self.labeller = labeller
        signer = None
        if signing_key is not None:
            from pipeline.keys import load_signer

            signer = load_signer(signing_key)
        inputs = labeller.inputs
        self.plan = plan_shards(len(inputs), shard_size=shard_size)
        outputs = labeller.outputs()
        uris = [o["uri"] for o in outputs]
        if not outputs or len(set(uris)) != len(uris):
            raise ValueError(f"labelling needs at least one output, each at its own uri; got {uris}")
        data = labeller.data()
        self.writers = [
            storage.SoftLabelWriter(
                **o,
                teacher=teacher,
                data=data,
                storage_options=storage_options,
                overwrite=overwrite,
                num_shards=len(self.plan),
                num_samples=len(inputs),
                signer=signer,
            )
            for o in outputs
        ]
        rows = labeller.rows_per_sample()
        self.shards = list(range(len(self.plan))) if shards is None else list(shards)
        self.committed = []
        for w in self.writers:
            if shards is None:
                commits = w.commits()
            else:
                commits = {i: rec for i in self.shards if (rec := w.commit(i)) is not None}
            check_plan(w, self.plan, inputs.sample_ids, rows, commits)
            self.committed.append(set(commits))

    def lacking(self, i: int) -> list[int]:
        """The outputs that have not committed shard i."""
        return [j for j, done in enumerate(self.committed) if i not in done]

    def pending(self) -> list[int]:
        """Shards (of this run's) some output lacks, in plan order."""
        return [i for i in self.shards if self.lacking(i)]

    def compute(self, i: int) -> tuple[list[int], list[dict], float]:
        """The teacher's columns of shard i for the outputs lacking it (no storing)."""
        t0 = time.perf_counter()
        todo = self.lacking(i)
        a, b = self.plan[i]
        return todo, (self.labeller.shard(a, b, todo) if todo else []), t0

    def store(self, i: int, todo: list[int], columns: list[dict], t0: float) -> dict:
        """Commit shard i's columns to each output in `todo`; the shard's stats."""
        records = [self.writers[j].write_shard(i, **cols) for j, cols in zip(todo, columns)]
        for j in todo:
            self.committed[j].add(i)
        a, b = self.plan[i]
        dt = time.perf_counter() - t0
        rows = records[0]["num_rows"] if records else 0
        return {
            "shard": i,
            "samples": b - a,
            "rows": rows,
            "seconds": dt,
            "samples_per_s": (b - a) / dt if dt > 0 else float("inf"),
            "rows_per_s": rows / dt if dt > 0 else float("inf"),
            "outputs": [self.writers[j].uri for j in todo],
            "records": records,
        }

    def label_shard(self, i: int) -> dict:
        """Label shard i into every output lacking it (nothing when none does)."""
        return self.store(i, *self.compute(i))

    def run(self, progress: Callable[[dict], None] | None = None) -> list[dict]:
        """Every pending shard. On an accelerator, storing shard i overlaps the teacher's
        forward of shard i+1 (one write in flight: at most two shards of outputs in memory),
        so the teacher never waits; on CPU the forward already uses every core and a
        concurrent write only oversubscribes them (measured 1.31x vs 1.09x the forward
        alone), so there it runs in line."""
        stats = []

        def store(i: int, todo: list[int], columns: list[dict], t0: float) -> None:
            s = self.store(i, todo, columns, t0)
            stats.append(s)
            if progress is not None:
                progress(s)

        overlap = getattr(self.labeller.device, "type", "cpu") != "cpu"
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="distillery-store") as ex:
            inflight = None
            for i in self.pending():
                computed = self.compute(i)
                if inflight is not None:
                    inflight.result()
                inflight = ex.submit(store, i, *computed)
                if not overlap:
                    inflight.result()
            if inflight is not None:
                inflight.result()
        return stats

    def finalize(self) -> list[dict]:
        """Each output's complete manifest. One that a concurrent run (or an earlier one)
        already finalized over exactly the committed shards is not rewritten (finalizing
        re-reads every shard)."""
        out = []
        for w in self.writers:
            if w.is_finalized_as_committed():
                w.confirm()
                w.cleanup()  # what a killed run left behind after the manifest was written
                out.append(w.manifest)
            else:
                out.append(w.finalize())
        return out


def label(
    labeller: Labeller,
    *,
    shard_size: int,
    teacher: dict,
    storage_options: dict | None = None,
    overwrite: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Label every pending shard in this process and finalize: one result per output,
    {uri, manifest, shards: [stats of the shards written to it], skipped: [shards it had],
    seconds, rows_per_s}."""
    t0 = time.perf_counter()
    run = LabelRun(
        labeller, shard_size=shard_size, teacher=teacher, storage_options=storage_options, overwrite=overwrite
    )
    had = [sorted(done) for done in run.committed]
    stats = run.run(progress)
    manifests = run.finalize()
    dt = time.perf_counter() - t0
    out = []
    for w, m, skipped in zip(run.writers, manifests, had):
        mine = [s for s in stats if w.uri in s["outputs"]]
        rows = sum(s["records"][s["outputs"].index(w.uri)]["num_rows"] for s in mine)
        out.append(
            {
                "uri": w.uri,
                "manifest": m,
                "shards": mine,
                "skipped": skipped,
                "seconds": dt,
                "rows_per_s": rows / dt if rows and dt > 0 else 0.0,
            }
        )
    return out
