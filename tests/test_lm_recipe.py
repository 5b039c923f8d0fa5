"""The language-model recipe (`task: lm`) end to end through the CLI and real Prefect flows,
on tiny assets: a folder of text files, a tiny random Llama teacher saved as a Hugging Face
directory, one teacher pass storing top-k and sampled labels, a CE-only student and two KD
students streaming them, the report; resume, and clear refusals."""

import json
import os

import numpy as np
import pytest
import torch
import yaml
from _tiny_hf import WORDS, tiny_tokenizer

import storage

pytestmark = pytest.mark.usefixtures("prefect_harness")


def tiny_teacher(path, *, vocab: int, max_pos: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        tie_word_embeddings=True,
        pad_token_id=0,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(os.fspath(path))
    tiny_tokenizer(path)  # the teacher's own tokenizer, in its directory
    return path


def lm_config(tmp_path, **over) -> str:
    from pipeline.hf_files import load_tokenizer

    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for d in range(3):  # ~750 tokens
        (docs / f"{d}.txt").write_text(" ".join(rng.choice(WORDS, 250)))
    tok_dir = tiny_tokenizer(tmp_path / "tok")
    teacher = tiny_teacher(tmp_path / "teacher", vocab=len(load_tokenizer(str(tok_dir))))
    cfg = {
        "task": "lm",
        "name": "tinylm",
        "runs_dir": str(tmp_path / "runs"),
        "corpus": {"kind": "text_files", "path": str(docs), "seq_len": 16, "sizes": {"train": 24, "val": 8}},
        "teacher": {"name": "tiny-llama", "path": str(teacher)},
        "label": {
            "topk": {"k": 8, "dtype": "float16"},
            "sampled": {"draws": 16},
            "shard_size": 8,
            "batch_size": 4,
            "device": "cpu",
        },
        "students": {
            "models": [{"name": "s1", "arch": "llama", "kwargs": {"layers": 1, "hidden": 16, "heads": 2}}],
            "losses": ["ce", "topk_kl", "sampled_kl"],
            "temperatures": [1.0],
            "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "warmup_steps": 2, "device": "cpu"},
        },
    }
    for key, value in over.items():
        cfg[key] = value
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    from flows.cli import main

    tmp = tmp_path_factory.mktemp("lm")
    path = lm_config(tmp)
    rc = main(["run", path])
    return {"tmp": tmp, "config": path, "rc": rc}


def test_lm_recipe_end_to_end(lm_run, capsys):
    from flows.config import load_config

    assert lm_run["rc"] == 0
    cfg = load_config(lm_run["config"])
    rep = json.loads((cfg.run_dir() / "report.json").read_text())
    assert rep["task"] == "lm" and rep["metric"] == "perplexity" and rep["teacher"]["name"] == "tiny-llama"
    assert np.isfinite(rep["teacher"]["perplexity"]) and rep["teacher"]["perplexity"] > 1
    names = [s["name"] for s in rep["students"]]
    assert names == ["s1-baseline", "s1-T1-a0.5-topk_kl", "s1-T1-a0.5-sampled_kl"]
    steps = {s["steps"] for s in rep["students"]}
    assert steps == {2 * 24 // 4}  # equal steps: 6 batches x 2 epochs each
    for s in rep["students"]:
        assert np.isfinite(s["perplexity"]) and s["perplexity"] > 1
        assert (
            s["labels"] is None
            if s["loss"] == "ce"
            else s["labels"].endswith("topk" if s["loss"] == "topk_kl" else "sampled")
        )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        m = AutoModelForCausalLM.from_pretrained(s["hf_dir"], local_files_only=True)
        teacher_vocab = json.loads((lm_run["tmp"] / "teacher" / "config.json").read_text())["vocab_size"]
        assert m.config.vocab_size == teacher_vocab and AutoTokenizer.from_pretrained(s["hf_dir"]) is not None
    rows = {r["loss"]: r for r in rep["rows"]}
    assert rows["ce"]["gain"] is None and rows["topk_kl"]["gain"] is not None
    assert os.path.getsize(rep["chart"]) > 1000 and (cfg.run_dir() / "report.md").is_file()
    # both layouts from one teacher pass, complete and verified
    for layout, kind in (("topk", "token_topk"), ("sampled", "token_sampled")):
        ds = storage.open_soft_labels(cfg.label_uris()[layout], verify=True)
        m = ds.manifest
        assert m["representation"]["kind"] == kind and m["num_tokens"] == 24 * 16 and m["seq_len"] == 16
        assert m["teacher"]["fingerprint"] == rep["teacher"]["fingerprint"]
        assert rep["labels"][layout]["tokens"]["bytes_per_token"] > 0
    assert rep["labels"]["topk"]["tokens"]["k"] == 8 and rep["labels"]["sampled"]["tokens"]["draws"] == 16


def test_cli_prints_the_report_and_inspect_shows_bytes_per_token(lm_run, capsys):
    from flows.cli import main
    from flows.config import load_config

    cfg = load_config(lm_run["config"])
    assert main(["students", lm_run["config"]]) == 0  # the students alone, from the stored labels
    out = capsys.readouterr().out
    assert "teacher: tiny-llama" in out and "ppl" in out and "s1" in out and "bytes/token" in out
    assert "sampled_kl" in out
    assert main(["inspect", cfg.label_uris()["topk"]]) == 0
    out = capsys.readouterr().out
    assert "bytes/token" in out and "missing mass over 384 positions" in out
    # --replay rebuilds the windows from the recorded corpus section (its splits in config
    # order, train before val) and recomputes both layouts with the recorded teacher
    for layout in ("topk", "sampled"):
        assert main(["inspect", cfg.label_uris()[layout], "--replay", "6"]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert "6 windows recomputed with the teacher" in out and ": match" in out
        assert "differ: 0 of 96" in out


def test_documents_windows_run_end_to_end_with_variable_length_labels(tmp_path, capsys):
    """corpus.windows=documents through the CLI: documents of mixed lengths, labels of
    variable-length sequences, a CE and a KD student, inspect showing the lengths."""
    from flows.cli import main
    from flows.config import load_config

    path = lm_config(tmp_path)
    rng = np.random.default_rng(1)
    for d, n in enumerate([5, 30, 70, 12, 44, 9, 100, 3, 60, 25, 50, 18, 80, 7, 40]):  # replaces the 3 documents
        (tmp_path / "docs" / f"{d}.txt").write_text(" ".join(rng.choice(WORDS, n)))
    over = [
        "corpus.windows=documents",
        "corpus.sizes.train=20",
        "corpus.sizes.val=6",
        "students.losses=[ce,topk_kl]",
        "label.sampled=null",
    ]
    assert main(["run", path, *over]) == 0
    out = capsys.readouterr().out
    assert "never crossing a document" in out and "topk_kl" in out
    cfg = load_config(path, over)
    ds = storage.open_soft_labels(cfg.label_uris()["topk"])
    assert storage.verify(cfg.label_uris()["topk"]).ok
    assert ds.num_sequences == 20 and ds.manifest["num_tokens"] < 20 * 16  # shorter last windows
    lengths = np.concatenate([b["length"] for b in ds.iter_sequences(8, shuffle=False)])
    assert lengths.sum() == ds.manifest["num_tokens"] and lengths.min() < 16
    report = json.loads((cfg.run_dir() / "report.json").read_text())
    assert {r["loss"] for r in report["rows"]} == {"ce", "topk_kl"} and report["data"]["windows"] == "documents"
    assert main(["inspect", cfg.label_uris()["topk"]]) == 0
    assert "20 sequences of up to 16, mean" in capsys.readouterr().out


def test_label_again_skips_every_committed_shard(lm_run, capsys):
    from flows.cli import main
    from flows.config import load_config

    cfg = load_config(lm_run["config"])
    before = [s["sha256"] for s in storage.open_soft_labels(cfg.label_uris()["topk"]).shards]
    assert main(["label", lm_run["config"]]) == 0
    out = capsys.readouterr().out
    assert "0 shards labelled, 3 skipped" in out
    assert [s["sha256"] for s in storage.open_soft_labels(cfg.label_uris()["topk"]).shards] == before


def test_a_student_with_another_tokenizer_is_refused(lm_run, tmp_path, capsys):
    """Labels name token ids of the teacher's tokenizer: a corpus tokenized otherwise is refused."""
    from flows.config import load_config
    from flows.recipes import ensure_teacher, student_runs, train_student

    first = load_config(lm_run["config"])
    other = tiny_teacher(tmp_path / "other", vocab=len(WORDS) + 5)  # the same weights...
    tiny_tokenizer(other, words=list(reversed(WORDS)))  # ...another tokenizer: same size, other ids
    cfg = load_config(
        lm_run["config"],
        [f"teacher.path={other}", f"label.uri={first.label_uris()['topk'][:-5]}", f"runs_dir={tmp_path / 'runs'}"],
    )
    teacher = ensure_teacher(cfg)
    run = next(r for r in student_runs(cfg) if r["loss"] == "topk_kl")
    with pytest.raises(ValueError, match="tokenizer fingerprint"):
        train_student(cfg, teacher, run)


def test_config_refusals_name_the_key(tmp_path, capsys):
    from flows.cli import main

    path = lm_config(tmp_path, label={"sampled": {"draws": 16}})  # topk_kl without top-k labels
    assert main(["run", path]) == 2
    assert "label.topk" in capsys.readouterr().err
    path = lm_config(
        tmp_path,
        corpus={
            "kind": "text_files",
            "path": str(tmp_path / "docs"),
            "seq_len": 16,
            "sizes": {"train": 24, "val": 8},
            "shuffle": True,
        },
    )
    assert main(["run", path]) == 2
    assert "corpus.shuffle: unknown key" in capsys.readouterr().err
    path = lm_config(tmp_path, task="lmm")
    assert main(["run", path]) == 2
    assert "task: must be one of" in capsys.readouterr().err
    path = lm_config(
        tmp_path,
        corpus={
            "kind": "text_files",
            "path": str(tmp_path / "nowhere"),
            "seq_len": 16,
            "sizes": {"train": 24, "val": 8},
        },
    )
    assert main(["run", path]) == 2
    assert "corpus.path: text_files folder not found" in capsys.readouterr().err


def test_runtime_refusals_are_one_line(tmp_path, capsys):
    from flows.cli import main

    # a sequence longer than the teacher's context (max_position_embeddings 64)
    path = lm_config(
        tmp_path,
        corpus={"kind": "text_files", "path": str(tmp_path / "docs"), "seq_len": 100, "sizes": {"train": 4, "val": 2}},
    )
    capsys.readouterr()  # the fixture's own output (saving the tiny teacher)
    assert main(["label", path]) == 2  # checked before any server starts
    err = capsys.readouterr().err
    assert "max_position_embeddings 64" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # more windows than the corpus has
    path = lm_config(
        tmp_path,
        corpus={
            "kind": "text_files",
            "path": str(tmp_path / "docs"),
            "seq_len": 16,
            "sizes": {"train": 4000, "val": 8},
        },
    )
    capsys.readouterr()  # the fixture's own output (saving the tiny teacher)
    assert main(["label", path]) == 2
    err = capsys.readouterr().err
    assert "lower corpus.sizes" in err and len(err.strip().splitlines()) == 1 and "ValueError" not in err
    # a corpus with no text at all
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    path = lm_config(
        tmp_path, corpus={"kind": "text_files", "path": str(empty), "seq_len": 16, "sizes": {"train": 4, "val": 2}}
    )
    capsys.readouterr()  # the fixture's own output (saving the tiny teacher)
    assert main(["label", path]) == 2
    err = capsys.readouterr().err
    assert "text" in err.lower() and len(err.strip().splitlines()) == 1


def test_lm_flows_become_scheduled_deployments(tmp_path):
    """`distill serve` / `deploy` on a `task: lm` config: the four flows, with the crons of
    its schedules section (the deployments are built, not served)."""
    from flows.deploy import deployments

    path = lm_config(tmp_path, schedules={"run": "0 3 * * *", "label": "30 1 * * 1"})
    deps = {d.name: d for d in deployments(path)}
    assert sorted(deps) == ["tinylm-distill", "tinylm-label", "tinylm-students", "tinylm-train-teacher"]
    assert deps["tinylm-distill"].entrypoint.endswith("flows.py:distill_flow")  # the same flows as classify
    assert [s.schedule.cron for s in deps["tinylm-distill"].schedules] == ["0 3 * * *"]
    assert [s.schedule.cron for s in deps["tinylm-label"].schedules] == ["30 1 * * 1"]
    assert deps["tinylm-students"].schedules in (None, [])
    assert deps["tinylm-label"].parameters["config"] == os.path.abspath(path)


def test_lm_labels_on_a_dask_cluster_equal_the_thread_runners(lm_run, tmp_path):
    """Language-model labelling is per-shard Prefect tasks too: on a Dask cluster (worker
    processes) they write the same bytes as the in-process run, both layouts."""
    from distributed import LocalCluster

    from flows.config import load_config
    from flows.flows import label_flow

    cfg = load_config(lm_run["config"])
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    ) as cluster:
        out = label_flow(lm_run["config"], [f"label.uri={tmp_path / 'dask'}"], dask_address=cluster.scheduler_address)
    assert out["labelled_shards"] == 3 and os.getpid() not in out["worker_pids"]
    for layout, uri in cfg.label_uris().items():
        ref = storage.open_soft_labels(uri).shards
        got = storage.open_soft_labels(str(tmp_path / "dask" / layout), verify=True).shards
        assert [s["sha256"] for s in got] == [s["sha256"] for s in ref]
