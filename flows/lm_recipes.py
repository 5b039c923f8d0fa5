"""The language-model recipe (`task: lm`), called by flows/lm_flows.py's tasks: plain
functions of an LMConfig and small dicts (URIs, numbers), never tensors across tasks.

    teacher = resolve_teacher(cfg)        the model directory (a GGUF converted once) + fingerprint
    labels  = label(cfg, teacher)         ONE teacher pass over the train windows -> topk and/or sampled datasets
    t_eval  = teacher_eval(cfg, teacher)  the teacher's validation perplexity (the students' ceiling)
    result  = train_student(cfg, teacher, run)   one student: one architecture, one loss, one seed
    report  = build_report(cfg, teacher, labels, t_eval, results)  report.json, report.md, students.png
"""
from __future__ import annotations

import json
import os
import statistics
import time

from pipeline.data.corpus import TokenCorpus
from pipeline.device import resolve_device
from pipeline.models.gguf import gguf_teacher_dir, load_causal_lm, teacher_fingerprint
from pipeline.training.lm_loop import LABEL_KIND, LMTrainConfig, train_lm_student
from pipeline.hf_files import resolve_model_path

from . import secrets
from .inspection import token_summary
from .lm_config import LMConfig

LAYOUT_OF_KIND = {"token_topk": "topk", "token_sampled": "sampled"}


def as_lm_config(raw: dict) -> LMConfig:
    return LMConfig.model_validate(raw)


# ------------------------------------------------------------------ teacher and corpus

def resolve_teacher(cfg: LMConfig) -> dict:
    """{"name", "dir", "fingerprint", "source"}: a GGUF file is converted once (cached by
    its sha256), a directory is used as it is."""
    t = cfg.teacher
    d = gguf_teacher_dir(t.gguf) if t.gguf else resolve_model_path(t.path, what="teacher model")
    return {"name": t.name, "dir": d, "fingerprint": teacher_fingerprint(d), "source": t.gguf or t.path}


def open_splits(cfg: LMConfig, tokenizer_dir: str) -> dict[str, TokenCorpus]:
    """The corpus tokenized with the teacher's tokenizer, cut into windows and split by
    corpus.sizes (deterministic in corpus.seed)."""
    c = cfg.corpus
    if c.kind == "jsonl":
        corpus = TokenCorpus.from_jsonl(c.path, tokenizer_path=tokenizer_dir, seq_len=c.seq_len,
                                        text_field=c.text_field, windows=c.windows)
    elif c.kind == "text_files":
        corpus = TokenCorpus.from_text_files(c.path, tokenizer_path=tokenizer_dir, seq_len=c.seq_len,
                                             windows=c.windows)
    else:
        corpus = TokenCorpus.from_table(c.path, c.text_field, tokenizer_path=tokenizer_dir, seq_len=c.seq_len,
                                        windows=c.windows)
    need = sum(c.sizes.values())
    if need > len(corpus):
        raise ValueError(f"corpus.sizes asks for {need:,} windows ({c.sizes}) but {c.path} gives {len(corpus):,} "
                         f"windows of {c.seq_len} tokens: lower corpus.sizes or corpus.seq_len")
    return corpus.split(seed=c.seed, sizes=dict(c.sizes))


# ------------------------------------------------------------------ labelling

def label_outputs(cfg: LMConfig) -> list[dict]:
    from pipeline.labelling.tokens import output_spec
    lab, out = cfg.label, []
    if lab.topk is not None:
        out.append(output_spec(uri=cfg.label_uri("topk"), representation="token_topk", k=lab.topk.k,
                               value_dtype=lab.topk.dtype, tail_dtype=lab.topk.tail_dtype, backend=lab.backend))
    if lab.sampled is not None:
        out.append(output_spec(uri=cfg.label_uri("sampled"), representation="token_sampled",
                               draws=lab.sampled.draws, s_max=lab.sampled.s_max, backend=lab.backend))
    return out


def label(cfg: LMConfig, teacher: dict, progress=None) -> dict:
    """The teacher scores the train windows once into every configured layout; committed
    shards are skipped (resume). Returns {layout: summary} with bytes per token."""
    from pipeline.labelling.tokens import label_corpus_many
    splits = open_splits(cfg, teacher["dir"])
    model = load_causal_lm(teacher["dir"])
    lab = cfg.label
    so = secrets.resolve(lab.storage_options) or None
    results = label_corpus_many(model, splits["train"], label_outputs(cfg), shard_size=lab.shard_size,
                                batch_size=lab.batch_size, device=lab.device, amp=lab.amp,
                                teacher={"name": teacher["name"], "fingerprint": teacher["fingerprint"],
                                         "source": teacher["source"]},
                                storage_options=so, overwrite=lab.overwrite,
                                seed=lab.seed, progress=progress)
    out = {}
    for r in results:
        layout = LAYOUT_OF_KIND[r["manifest"]["representation"]["kind"]]
        out[layout] = {"uri": r["uri"], "labelled_shards": len(r["shards"]), "skipped_shards": len(r["skipped"]),
                       "seconds": r["seconds"], "tokens_per_s": r["tokens_per_s"],
                       **summarize_labels(r["uri"], so)}
    return out


def summarize_labels(uri: str, storage_options: dict | None = None) -> dict:
    s = token_summary(uri, storage_options=storage_options)
    keep = ("num_tokens", "kind", "k", "draws", "dtype", "id_bits", "bytes_per_token", "measured", "mean", "p50", "p90")
    return {k: s[k] for k in keep if k in s}


def teacher_eval(cfg: LMConfig, teacher: dict) -> dict:
    """The teacher's validation perplexity, cached in the run directory by (teacher
    fingerprint, val windows' fingerprint): it is the same number every run."""
    from pipeline.models.causal_lm import param_count, perplexity
    splits = open_splits(cfg, teacher["dir"])
    key = {"teacher": teacher["fingerprint"], "val": splits["val"].fingerprint()}
    path = cfg.run_dir() / "teacher_eval.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached["eval"]
        except (OSError, ValueError):
            pass
    model = load_causal_lm(teacher["dir"])
    dev = resolve_device(cfg.label.device)      # where the teacher labels, by the same rule
    ev = perplexity(model.to(dev), splits["val"], batch_size=cfg.label.batch_size, device=dev)
    ev["params"] = param_count(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "eval": ev}, indent=2))
    os.replace(tmp, path)
    return ev


# ------------------------------------------------------------------ students

def student_runs(cfg: LMConfig) -> list[dict]:
    """Every (model, loss, seed) of the sweep: small dicts (Prefect task parameters)."""
    runs = []
    for m in cfg.students.models:
        for loss in cfg.students.losses:
            for seed in cfg.students.seeds:
                tail = "" if len(cfg.students.seeds) == 1 else f"-s{seed}"
                runs.append({"name": f"{m.display_name()}-{loss}{tail}", "arch_name": m.display_name(),
                             "model": m.model_dump(), "loss": loss, "seed": seed,
                             "labels": LAYOUT_OF_KIND.get(LABEL_KIND.get(loss))})
    names = [r["name"] for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"students.models give two students the same name {dup}: set models[].name")
    return runs


def train_student(cfg: LMConfig, teacher: dict, run: dict, progress=None) -> dict:
    """One student from scratch; saved (safetensors + tokenizer) under
    runs/<name>/students/<student>/. Returns the numbers the report needs."""
    from pipeline.models.causal_lm import llama_student, param_count, save_student
    from pipeline.hf_files import load_tokenizer
    splits = open_splits(cfg, teacher["dir"])
    tok = load_tokenizer(teacher["dir"])
    m = run["model"]
    vocab = _teacher_vocab(teacher["dir"])
    student = llama_student(vocab_size=vocab, layers=m["layers"], hidden=m["hidden"], heads=m["heads"],
                            kv_heads=m["kv_heads"], intermediate=m["intermediate"], max_positions=cfg.corpus.seq_len,
                            tie_embeddings=m["tie_embeddings"], seed=run["seed"],
                            special_ids={"eos": tok.eos_token_id, "bos": tok.bos_token_id})
    t = cfg.students.train
    tc = LMTrainConfig(loss=run["loss"], alpha=cfg.students.alpha if run["loss"] != "ce" else 0.0,
                       temperature=cfg.students.temperature, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                       weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, grad_clip=t.grad_clip,
                       seed=run["seed"], device=t.device, num_workers=t.num_workers, chunk_size=t.chunk_size)
    uri = cfg.label_uri(run["labels"]) if run["labels"] else None
    expect = {"teacher.fingerprint": teacher["fingerprint"]} if uri else None
    t0 = time.perf_counter()
    out = train_lm_student(student, splits["train"], splits["val"], tc, labels_uri=uri,
                           storage_options=secrets.resolve(cfg.label.storage_options) or None, expect=expect, progress=progress)
    path = str(cfg.run_dir() / "students" / run["name"])
    save_student(student, path, tokenizer_dir=teacher["dir"],
                 extra={"run": run, "labels": uri, "teacher": teacher["fingerprint"], "val": out["val"],
                        "train": out["config"]})
    return {"name": run["name"], "arch_name": run["arch_name"], "loss": run["loss"], "seed": run["seed"],
            "labels": uri, "params": param_count(student), "steps": out["steps"], "tokens": out["tokens"],
            "train_tokens_per_s": out["train_tokens_per_s"], "seconds": time.perf_counter() - t0,
            "final_train_loss": out["final_train_loss"], "val_loss": out["val"]["loss"],
            "val_perplexity": out["val"]["perplexity"], "path": path}


def _teacher_vocab(d: str) -> int:
    with open(os.path.join(d, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


# ------------------------------------------------------------------ report

def aggregate(results: list[dict]) -> list[dict]:
    """One row per (architecture, loss): mean and std over seeds of validation perplexity."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["arch_name"], r["loss"]), []).append(r)
    rows = []
    for (arch, loss), rs in groups.items():
        ppl = [r["val_perplexity"] for r in rs]
        rows.append({"student": arch, "loss": loss, "labels": rs[0]["labels"], "seeds": len(rs),
                     "params": rs[0]["params"], "steps": rs[0]["steps"], "val_perplexity": statistics.fmean(ppl),
                     "val_perplexity_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                     "val_loss": statistics.fmean(r["val_loss"] for r in rs),
                     "train_tokens_per_s": statistics.fmean(r["train_tokens_per_s"] for r in rs)})
    for row in rows:   # against the CE-only student of the same architecture
        ce = next((r for r in rows if r["student"] == row["student"] and r["loss"] == "ce"), None)
        row["vs_ce"] = None if ce is None or row["loss"] == "ce" else row["val_perplexity"] / ce["val_perplexity"] - 1
    return rows


def report_table(report: dict) -> str:
    t = report["teacher"]
    lines = [f"teacher {t['name']} ({t['params'] / 1e6:.1f}M params): validation perplexity {t['val_perplexity']:.2f}",
             "", f"{'student':<16} {'loss':<11} {'params':>8} {'steps':>6} {'val ppl':>14} {'vs ce':>7}"]
    for r in report["rows"]:
        ppl = f"{r['val_perplexity']:.1f}" + (f" ± {r['val_perplexity_std']:.1f}" if r["seeds"] > 1 else "")
        vs = "" if r["vs_ce"] is None else f"{100 * r['vs_ce']:+.0f}%"
        lines.append(f"{r['student']:<16} {r['loss']:<11} {r['params'] / 1e6:>7.2f}M {r['steps']:>6} {ppl:>14} {vs:>7}")
    lines.append("")
    for layout, s in report["labels"].items():
        what = (f"top-{s['k']} {s['dtype']} log-probs + missing mass (mean {s['mean']:.3f})" if layout == "topk"
                else f"{s['draws']} draws (mean {s['mean']:.1f} unique ids per token)")
        lines.append(f"labels {layout}: {s['num_tokens']:,} tokens, {what}: {s['bytes_per_token']:.1f} bytes/token")
    d = report["data"]
    size = (f"x {d['seq_len']} tokens" if d.get("windows", "packed") == "packed"
            else f"of up to {d['seq_len']} tokens, never crossing a document")
    lines.append(f"\nstudents: {d['train_windows']:,} train windows {size}, equal steps per student; "
                 f"val ppl on {d['val_windows']:,} held-out windows"
                 + (f", mean ± std over {d['seeds']} seeds" if d["seeds"] > 1 else "")
                 + ". ce: next-token cross-entropy only; the others: "
                 + (f"{d['alpha']:g} x CE + {1 - d['alpha']:g} x KD from the stored teacher labels" if d["alpha"]
                    else "KD from the stored teacher labels alone") + ".")
    return "\n".join(lines)


def students_png(report: dict) -> bytes:
    """Validation perplexity per student (bars, log scale) with the teacher as a dashed line."""
    import io

    from matplotlib.figure import Figure
    rows = report["rows"]
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.subplots()
    colors = {"ce": "0.6"}
    xs = range(len(rows))
    ax.bar(xs, [r["val_perplexity"] for r in rows], yerr=[r["val_perplexity_std"] for r in rows],
           color=[colors.get(r["loss"], "C0") for r in rows], capsize=3)
    ax.axhline(report["teacher"]["val_perplexity"], color="0.3", ls="--", lw=1)
    ax.text(0.01, report["teacher"]["val_perplexity"], f" teacher {report['teacher']['val_perplexity']:.1f}",
            transform=ax.get_yaxis_transform(), va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [f"{r['student']}\n{r['loss']}" for r in rows], fontsize=8)
    ax.set_ylabel("validation perplexity (log)")
    ax.set_title(f"{report['name']}: students from stored token labels vs next-token CE", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def build_report(cfg: LMConfig, teacher: dict, labels: dict, t_eval: dict, results: list[dict]) -> dict:
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not labels:   # students run on their own: read what the label run stored
        labels = {layout: {"uri": cfg.label_uri(layout), **summarize_labels(cfg.label_uri(layout),
                                                                             secrets.resolve(cfg.label.storage_options) or None)}
                  for layout in cfg.label.layouts()}
    report = {"name": cfg.name, "task": "lm",
              "teacher": {"name": teacher["name"], "fingerprint": teacher["fingerprint"], "source": teacher["source"],
                          "params": t_eval["params"], "val_perplexity": t_eval["perplexity"],
                          "val_loss": t_eval["loss"]},
              "labels": labels, "students": results, "rows": aggregate(results),
              "data": {"corpus": cfg.corpus.path, "seq_len": cfg.corpus.seq_len, "windows": cfg.corpus.windows,
                       "train_windows": cfg.corpus.sizes["train"], "val_windows": cfg.corpus.sizes["val"],
                       "seeds": len(cfg.students.seeds), "alpha": cfg.students.alpha}}
    png = run_dir / "students.png"
    png.write_bytes(students_png(report))
    report["chart"] = str(png)
    report["path"] = str(run_dir / "report.json")
    tmp = run_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, run_dir / "report.json")
    (run_dir / "report.md").write_text(f"# {cfg.name}\n\n```\n{report_table(report)}\n```\n\n![students](students.png)\n")
    return report
