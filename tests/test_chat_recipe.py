"""`corpus.kind: chat` through the CLI and real Prefect flows (issue 22), on tiny assets shaped
like the recipe's data (.assets/chitchat.jsonl: {"messages": [{role, content}]} per line,
many turns, some conversations longer than seq_len): a tiny random Llama teacher whose
directory holds a ChatML tokenizer, labels on assistant targets only, students trained and
scored on those tokens, `distill inspect` showing the labelled share, `--replay` passing,
and bad conversations refused in one line with nothing stored."""

import json
import os

import numpy as np
import pytest
import yaml
from _tiny_hf import WORDS, tiny_chat_tokenizer

import storage

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _conversations(path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            turns = int(rng.integers(2, 9))
            msgs = [
                {
                    "role": "user" if t % 2 == 0 else "assistant",
                    "content": " ".join(rng.choice(WORDS, rng.integers(1, 7))),
                }
                for t in range(turns)
            ]
            f.write(json.dumps({"id": f"c{i}", "messages": msgs}) + "\n")
    return str(path)


def chat_config(tmp_path, **over) -> str:
    from test_lm_recipe import tiny_teacher

    from pipeline.hf_files import load_tokenizer

    teacher = tiny_teacher(tmp_path / "teacher", vocab=64)
    tiny_chat_tokenizer(teacher)  # the teacher's own tokenizer, with its chat template
    assert len(load_tokenizer(str(teacher))) <= 64
    cfg = {
        "task": "lm",
        "name": "tinychat",
        "runs_dir": str(tmp_path / "runs"),
        "corpus": {
            "kind": "chat",
            "path": _conversations(tmp_path / "chat.jsonl"),
            "seq_len": 24,
            "too_long": "skip",
            "sizes": {"train": 24, "val": 6, "test": 6},
        },
        "teacher": {"name": "tiny-llama", "path": str(teacher)},
        "label": {
            "topk": {"k": 8, "dtype": "float16"},
            "sampled": {"draws": 16},
            "shard_size": 8,
            "batch_size": 4,
            "generate": {"answers": 2, "max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "prompts": 10},
        },
        "students": {
            "models": [{"name": "s1", "arch": "llama", "kwargs": {"layers": 1, "hidden": 16, "heads": 2}}],
            "losses": ["topk_kl", "sampled_kl"],
            "data": ["human", "generated"],
            "alphas": [0.0],
            "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "warmup_steps": 2, "device": "cpu"},
        },
    } | over
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    from flows.cli import main

    tmp = tmp_path_factory.mktemp("chat")
    path = chat_config(tmp)
    return {"tmp": tmp, "config": path, "rc": main(["run", path])}


def test_chat_recipe_labels_and_scores_assistant_tokens_only(chat_run, capsys):
    from flows.config import load_config
    from flows.lm import splits

    assert chat_run["rc"] == 0
    cfg = load_config(chat_run["config"])
    rep = json.loads((cfg.run_dir() / "report.json").read_text())
    parts = splits(cfg)
    train, test = parts["train"], parts["test"]
    for layout in ("topk", "sampled"):
        m = storage.open_soft_labels(cfg.label_uris()[layout], verify=True).manifest
        # one row per assistant target of the train conversations, nothing else
        assert m["num_tokens"] == train.num_positions < int(train.lengths(np.arange(len(train))).sum())
        assert m["data"]["inputs"]["chat"]["template_sha256"] == train.describe()["chat"]["template_sha256"]
    assert rep["teacher"]["tokens"] == test.num_positions  # perplexity over assistant tokens
    human = ["s1-baseline", "s1-T1-a0-topk_kl", "s1-T1-a0-sampled_kl"]
    seqkd = ["s1-seqkd", "s1-seqkd-T1-a0.5-topk_kl", "s1-seqkd-T1-a0.5-sampled_kl"]
    assert [s["name"] for s in rep["students"]] == human + seqkd
    steps = {s["name"]: s["steps"] for s in rep["students"]}
    # exactly equal steps, whichever text: 2 epochs of the train windows in batches of 4
    assert set(steps.values()) == {2 * -(-len(train) // 4)}, steps
    # the teacher's answers: 2 to each of the first 10 train prompts, each token labelled
    gen = storage.open_soft_labels(cfg.label_uris("generate")["topk"], verify=True).manifest
    assert gen["num_samples"] == 20 and gen["representation"]["tokens"] is True
    assert gen["data"]["generation"]["temperature"] == 0.7 and gen["seq_len"] == 8
    sampled = storage.open_soft_labels(cfg.label_uris("generate")["sampled"], verify=True).manifest
    assert sampled["num_tokens"] == gen["num_tokens"]  # the same answers, from one generation
    assert (
        f"CE on the teacher's own {gen['num_tokens']:,} tokens, 2 answer(s) to each of 10 train prompts"
        in (cfg.run_dir() / "report.md").read_text()
    )
    d = rep["data"]
    assert d["train_conversations"] == 24 and d["eval_tokens"] == test.num_positions
    md = (cfg.run_dir() / "report.md").read_text()
    assert "24 train conversations" in md and "assistant tokens of 6 held-out `test` conversations" in md


def test_inspect_shows_the_labelled_share_and_replay_passes(chat_run, capsys):
    from flows.cli import main
    from flows.config import load_config

    cfg = load_config(chat_run["config"])
    uri = cfg.label_uris()["topk"]
    capsys.readouterr()
    assert main(["inspect", uri]) == 0
    out = capsys.readouterr().out
    chat = storage.open_soft_labels(uri).manifest["data"]["inputs"]["chat"]
    assert f"chat: {chat['labelled_positions']:,} of {chat['positions']:,} positions labelled" in out
    assert "in 24 conversations" in out  # the train split's, not the file's 40
    assert "bytes per labelled token" in out
    for layout in ("topk", "sampled"):
        assert main(["inspect", cfg.label_uris()[layout], "--replay", "4"]) == 0, capsys.readouterr().err
    # the teacher's answers: the settings, and a replay by plain forwards over prompt + answer
    gen = cfg.label_uris("generate")["topk"]
    capsys.readouterr()
    assert main(["inspect", gen, "--replay", "4"]) == 0
    out = capsys.readouterr().out
    assert "generated: the teacher's answers, 2 to each of 10 prompts (temperature 0.7, top-p 0.9" in out
    assert "match" in out


@pytest.mark.parametrize(
    "line,what",
    [
        ('{"messages": [{"role": "user", "content": "the"}, {"role": "robot", "content": "a"}]}', "unknown role"),
        ('{"messages": [{"role": "user", "content": "the"}, {"role": "assistant", "content": ""}]}', "empty assistant"),
    ],
)
def test_a_bad_conversation_is_one_line_naming_file_and_line_and_nothing_is_stored(tmp_path, capsys, line, what):
    from flows.cli import main
    from flows.config import load_config

    path = chat_config(tmp_path)
    data = tmp_path / "chat.jsonl"
    with open(data, "a") as f:
        f.write(line + "\n")
    capsys.readouterr()  # the tiny teacher's save progress
    assert main(["label", path]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and what in err[0] and f"{data}: line 41" in err[0], err
    assert "Traceback" not in err[0]
    cfg = load_config(path)
    assert not any(os.path.exists(u) for u in cfg.label_uris().values())
