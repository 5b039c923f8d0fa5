"""Chat distillation (issue 22's numbers), on configs/chat.yaml's data and teacher
(SmolLM2-135M-Instruct over the chitchat conversations), three parts measured side by side:

  bytes    the same train conversations labelled twice, assistant targets only (the recipe)
           and every position (corpus.labelled: all): bytes on disk per conversation, their
           ratio next to the assistant share of positions (expected about equal).
  quality  the recipe's students over --seeds: CE on the human answers (the baseline), token
           KD on them, sequence-level KD (CE on the teacher's written answers) and both (0.5 x
           that CE + 0.5 x token KD); assistant-token perplexity on held-out conversations,
           per seed. Target: token KD beats CE on every seed (the scratch Llama; the pruned
           SmolLM2 in the recipe run, one seed: --pruned adds it here).
  generate the teacher writing answers with their labels (GenerationLabeller, top-k of every
           written token from the same forwards) vs its plain `generate` (sampling, no labels)
           on the same prompts and batches, alternated --repeats times: written tokens per
           second, ratio. Target >= 0.9.

    python benchmarks/chat_kd.py [--parts bytes quality generate] [--seeds 0 1 2] [--pruned]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402

import storage  # noqa: E402
from flows import recipes  # noqa: E402
from flows.config import load_config  # noqa: E402
from flows.report import report_table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(a, runs_dir, *over):
    os.chdir(ROOT)  # the config's relative paths (.assets/)
    return load_config(a.config, [f"runs_dir={runs_dir}", *over, *a.overrides])


def _label(cfg, teacher, job="windows"):
    for p in recipes.plan_labels(cfg, teacher, job)["pending"]:
        recipes.label_one_shard(cfg, teacher, p["shard"], job)
    return recipes.finalize_labels(cfg, teacher, job)


def part_bytes(a) -> bool:
    runs = tempfile.mkdtemp(prefix="distillery-chat-bytes-")
    sizes = f"corpus.sizes={{train: {a.bytes_conversations}, val: 1}}"
    out = {}
    for how in ("assistant", "all"):
        cfg = _config(
            a,
            runs,
            sizes,
            f"corpus.labelled={how}",
            f"name=bytes-{how}",
            "label.generate=null",
            "students.data=[human]",
        )
        teacher = recipes.ensure_teacher(cfg)
        t0 = time.perf_counter()
        _label(cfg, teacher)
        m = storage.open_soft_labels(cfg.label_uris()["topk"]).manifest
        chat = m["data"]["inputs"]["chat"]
        out[how] = {
            "bytes": storage.total_bytes(m),
            "tokens": m["num_tokens"],
            "seconds": time.perf_counter() - t0,
            "share": chat["labelled_share"],
            "positions": chat["positions"],
        }
    n = a.bytes_conversations
    print(f"\nbytes: {n} train conversations, top-32 uint8 log-probs + missing mass")
    print(f"{'labelled':<12}{'positions':>12}{'bytes':>14}{'bytes/conv':>12}{'bytes/token':>13}{'seconds':>9}")
    for how, r in out.items():
        print(
            f"{how:<12}{r['tokens']:>12,}{r['bytes']:>14,}{r['bytes'] / n:>12,.0f}"
            f"{r['bytes'] / r['tokens']:>13.1f}{r['seconds']:>9.1f}"
        )
    ratio = out["assistant"]["bytes"] / out["all"]["bytes"]
    share = out["assistant"]["share"]
    ok = abs(ratio - share) <= 0.05
    print(
        f"assistant-only / every position: {ratio:.3f} of the bytes; assistant share of positions {share:.3f}: "
        f"{'PASS' if ok else 'FAIL'} (within 0.05)"
    )
    return ok


def part_quality(a) -> bool:
    runs = tempfile.mkdtemp(prefix="distillery-chat-kd-")
    cfg = _config(a, runs, f"students.seeds={a.seeds}")
    keep = [m for m in cfg.students.models if a.pruned or m.arch != "pruned"]
    cfg.students.models = keep
    t0 = time.perf_counter()
    teacher = recipes.ensure_teacher(cfg)
    for job in cfg.label_jobs():
        _label(cfg, teacher, job)
    t_eval = recipes.task_recipes(cfg).teacher_evaluation(cfg, teacher)
    print(
        f"\nquality: labelled and answers written in {time.perf_counter() - t0:.0f}s; teacher assistant-token "
        f"perplexity {t_eval['perplexity']:.2f} on {t_eval['tokens']:,} tokens",
        flush=True,
    )
    results = []
    for run in recipes.student_runs(cfg):
        r = recipes.train_student(cfg, teacher, run)
        print(
            f"  {r['name']:<44} ppl {r['perplexity']:9.2f} ({r['steps']} steps, {r['train_seconds']:.0f}s)", flush=True
        )
        results.append(r)
    report = recipes.build_report(cfg, teacher, results)
    print()
    print(report_table(report))
    rows = report["rows"]
    print("\nper seed: assistant-token perplexity on held-out conversations (lower is better)")
    print(f"{'student':<44}" + "".join(f"{'seed ' + str(s):>12}" for s in a.seeds) + f"{'mean':>10}")
    for r in rows:
        print(f"{r['name']:<44}" + "".join(f"{v:>12.2f}" for v in r["per_seed"]) + f"{r['perplexity']:>10.2f}")
    ok = True
    for arch in dict.fromkeys(r["arch_name"] for r in rows):
        base = next(r for r in rows if r["arch_name"] == arch and r["loss"] == "ce" and r.get("data") == "human")
        kd = next((r for r in rows if r["arch_name"] == arch and r["loss"] != "ce" and r.get("data") == "human"), None)
        if kd is None:
            continue
        wins = all(k < b for k, b in zip(kd["per_seed"], base["per_seed"]))
        ok &= wins
        print(
            f"{arch}: token KD {kd['perplexity']:.2f} vs CE {base['perplexity']:.2f} on the same assistant tokens: "
            f"{'beats CE on every seed' if wins else 'does NOT beat CE on every seed'}"
        )
    print(f"target: token KD beats CE on every seed: {'PASS' if ok else 'FAIL'} ({time.perf_counter() - t0:.0f}s)")
    return ok


def part_generate(a) -> bool:
    import torch

    from pipeline.labelling.generate import GenerationLabeller, plain_generate_rate
    from pipeline.labelling.tokens import output_spec
    from pipeline.models.gguf import load_causal_lm

    cfg = _config(a, tempfile.mkdtemp(prefix="distillery-chat-gen-"))
    teacher = recipes.ensure_teacher(cfg)
    train = recipes.task_recipes(cfg).splits(cfg)["train"]
    g = cfg.label.generate
    model = load_causal_lm(teacher["dir"])
    out = output_spec(
        uri=os.path.join(cfg.runs_dir, "gen-bench"), representation="token_topk", k=32, value_dtype="uint8"
    )
    lab = GenerationLabeller(
        model,
        train,
        [out],
        answers=1,
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        seed=g.seed,
        prompts=a.prompts,
        batch_size=cfg.label.batch_size,
        device=cfg.label.device,
    )
    prompts = lab.inputs.prompts
    print(
        f"\ngenerate: {len(prompts)} prompts (mean {np.mean([len(p) for p in prompts]):.0f} tokens), batches of "
        f"{cfg.label.batch_size}, at most {g.max_new_tokens} new tokens, temperature {g.temperature:g}, top-p "
        f"{g.top_p:g}, {torch.get_num_threads()} threads, device {lab.device}"
    )
    labelled, plain = [], []
    for rep in range(a.repeats):  # alternated: the machine's drift hits both alike
        t0 = time.perf_counter()
        cols = lab.shard(0, len(lab.inputs), [0])[0]
        dt = time.perf_counter() - t0
        labelled.append(len(cols["token"]) / dt)
        p = plain_generate_rate(
            model, prompts, batch_size=cfg.label.batch_size, settings=lab.settings, device=lab.device
        )
        plain.append(p["tokens_per_s"])
        print(
            f"  repeat {rep}: written + labelled {labelled[-1]:7.1f} tokens/s ({len(cols['token'])} tokens); "
            f"plain generate {plain[-1]:7.1f} tokens/s ({p['tokens']} tokens)",
            flush=True,
        )
    ratio = statistics.median(labelled) / statistics.median(plain)
    ok = ratio >= 0.9
    print(f"generation labelling / plain generation, medians: {ratio:.3f} (target >= 0.9): {'PASS' if ok else 'FAIL'}")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "chat.yaml"))
    ap.add_argument(
        "--parts", nargs="+", choices=["bytes", "quality", "generate"], default=["bytes", "quality", "generate"]
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pruned", action="store_true", help="also the pruned SmolLM2 (slow: ~4 min a run)")
    ap.add_argument("--bytes-conversations", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    results = {p: globals()[f"part_{p}"](a) for p in a.parts}
    print("\n" + ", ".join(f"{p}: {'PASS' if ok else 'FAIL'}" for p, ok in results.items()))


if __name__ == "__main__":
    main()
