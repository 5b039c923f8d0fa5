"""Chat corpora (issue 22): conversations rendered with the tokenizer's own chat template,
the assistant's tokens marked, windows of whole turns, labels stored on assistant targets
only, and losses / perplexity that count those positions alone. A tiny word-level tokenizer
with ChatML and a tiny random Llama teacher; expected ids come from the vocabulary, not from
the code under test."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny_hf import CHATML, tiny_chat_tokenizer

import pipeline.hf_files  # noqa: F401  (offline mode before transformers)
import storage
from pipeline.data.corpus import TokenCorpus
from pipeline.labelling.tokens import label_corpus_many, output_spec
from pipeline.models.causal_lm import perplexity
from pipeline.objectives.objective import Objective
from pipeline.training.stream import open_label_stream
from pipeline.training.windows import TokenLabels, collate_tokens

TEACHER = {"name": "tiny-llama", "fingerprint": "sha256:tiny-llama-0"}
K, DRAWS = 8, 16

CONVS = [
    [("user", "the dress"), ("assistant", "good fit"), ("user", "so small"), ("assistant", "not bad")],
    [("system", "so nice"), ("user", "i love it"), ("assistant", "great color and soft fabric")],
    [("user", "is it cheap"), ("assistant", "very cheap"), ("user", "but tight"), ("assistant", "return it")],
    [("user", "hello")],  # no assistant message: skipped, counted
    [
        ("user", "the top is too loose"),
        ("assistant", "wear a small size"),
        ("user", "the small is tight"),
        ("assistant", "so a large"),
        ("user", "ugly color"),
        ("assistant", "it is beautiful"),
    ],
]


def _jsonl(path, convs=CONVS, extra_lines=()):
    with open(path, "w") as f:
        for c in convs:
            f.write(json.dumps({"messages": [{"role": r, "content": t} for r, t in c]}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from test_lm_label import tiny_llama

    from pipeline.hf_files import load_tokenizer

    root = tmp_path_factory.mktemp("chat")
    tok_dir = str(tiny_chat_tokenizer(root / "tok"))
    tok = load_tokenizer(tok_dir)
    path = _jsonl(root / "chat.jsonl")
    corpus = TokenCorpus.from_chat(path, tokenizer_path=tok_dir, seq_len=64, cache_dir=str(root / "cache"))
    return {"root": root, "tok": tok, "tok_dir": tok_dir, "path": path, "corpus": corpus, "model": tiny_llama(len(tok))}


def _ids(tok, words: str) -> list[int]:
    v = tok.get_vocab()
    return [v[w] for w in words.split()]


def test_the_mask_marks_each_answer_and_its_end_of_turn(env):
    tok, c = env["tok"], env["corpus"]
    end = tok.get_vocab()["<|im_end|>"]
    assert len(c) == 4  # four conversations with an answer, one window each at seq_len 64
    b = c.lm_batch(np.arange(len(c)))
    answers = [[t for r, t in conv if r == "assistant"] for conv in CONVS if any(r == "assistant" for r, _ in conv)]
    for j, texts in enumerate(answers):
        want = sum((_ids(tok, t) + [end] for t in texts), [])  # each answer's words, then <|im_end|>
        assert b["targets"][j][b["mask"][j]].tolist() == want
        # the inputs are the rendered conversation: it starts with <|im_start|> and a role
        assert b["input_ids"][j][0] == tok.get_vocab()["<|im_start|>"]
    chat = c.describe()["chat"]
    assert chat["conversations"] == 4 and chat["skipped_without_assistant"] == 1
    assert chat["labelled_positions"] == int(b["mask"].sum()) == c.num_positions
    assert chat["labelled_share"] == pytest.approx(c.num_positions / c.lengths(np.arange(len(c))).sum())


def test_long_conversations_are_cut_between_messages_and_never_share_a_window(env, tmp_path):
    tok = env["tok"]
    c = TokenCorpus.from_chat(env["path"], tokenizer_path=env["tok_dir"], seq_len=12, cache_dir=str(tmp_path))
    start = tok.get_vocab()["<|im_start|>"]
    w, n = c.windows(np.arange(len(c))), c.lengths(np.arange(len(c)))
    assert (n <= 12).all() and len(c) > 4
    assert (w[:, 0] == start).all()  # every window begins at a message
    conv = c.conversations(np.arange(len(c)))
    assert (np.diff(conv) >= 0).all() and len(np.unique(conv)) == 4
    # the windows of a conversation tile it: every assistant target labelled exactly once
    full = TokenCorpus.from_chat(env["path"], tokenizer_path=env["tok_dir"], seq_len=64, cache_dir=str(tmp_path))
    assert c.num_positions == full.num_positions
    assert int(c.assistant_mask.sum()) == full.describe()["chat"]["assistant_tokens"]
    # the separator between conversations is the last target of a conversation, never labelled
    sep = tok.eos_token_id
    b = c.lm_batch(np.arange(len(c)))
    ends = [j for j in range(len(c)) if b["targets"][j, n[j] - 1] == sep and not b["mask"][j, n[j] - 1]]
    assert len(ends) >= 4


def test_splits_keep_conversations_whole(env, tmp_path):
    c = TokenCorpus.from_chat(env["path"], tokenizer_path=env["tok_dir"], seq_len=12, cache_dir=str(tmp_path))
    parts = c.split(seed=0, sizes={"train": 2, "val": 1, "test": 1})
    convs = {name: set(c.conversations(c.index_of(p.sample_ids)).tolist()) for name, p in parts.items()}
    assert [len(v) for v in convs.values()] == [2, 1, 1]
    assert set.union(*convs.values()) == set(range(4))  # disjoint and complete
    assert sum(len(p) for p in parts.values()) == len(c)  # every window of a conversation goes with it
    with pytest.raises(ValueError, match="asks for 5 conversations"):
        c.split(seed=0, sizes={"train": 4, "val": 1})


BAD = [
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}', "empty assistant"),
    ('{"messages": [{"role": "user", "content": 3}]}', "content is int"),
    ('{"messages": "hello"}', "non-empty list"),
    ('{"text": "hello"}', "no field 'messages'"),
    ("{not json", "is not JSON"),
]


@pytest.mark.parametrize("line,what", BAD, ids=[w for _, w in BAD])
def test_bad_conversations_are_refused_naming_file_and_line(env, tmp_path, line, what):
    path = _jsonl(tmp_path / "bad.jsonl", CONVS[:2], [line])
    with pytest.raises(ValueError) as e:
        TokenCorpus.from_chat(path, tokenizer_path=env["tok_dir"], seq_len=32, cache_dir=str(tmp_path / "cache"))
    msg = str(e.value)
    assert what in msg and f"{path}: line 3" in msg and "\n" not in msg
    # nothing that opens is left in the cache: no sidecar, the next open rebuilds
    assert not list((tmp_path / "cache").glob("*.json")) if (tmp_path / "cache").exists() else True


def test_a_message_longer_than_seq_len_is_refused_or_its_conversation_skipped(env, tmp_path):
    with pytest.raises(ValueError, match=r"chat.jsonl: line 2: message 2 takes 8 tokens .* more than seq_len 6"):
        TokenCorpus.from_chat(env["path"], tokenizer_path=env["tok_dir"], seq_len=6, cache_dir=str(tmp_path))
    c = TokenCorpus.from_chat(
        env["path"], tokenizer_path=env["tok_dir"], seq_len=6, cache_dir=str(tmp_path), too_long="skip"
    )
    chat = c.describe()["chat"]
    assert chat["skipped_too_long"] >= 1 and (c.lengths(np.arange(len(c))) <= 6).all()


def test_a_tokenizer_without_a_chat_template_is_refused(env, tmp_path):
    plain = tiny_chat_tokenizer(tmp_path / "plain", template=None)
    with pytest.raises(ValueError, match="has no chat template"):
        TokenCorpus.from_chat(env["path"], tokenizer_path=str(plain), seq_len=32, cache_dir=str(tmp_path))
    # a template whose render of a conversation's start is not a prefix of the whole: no spans
    odd = tiny_chat_tokenizer(tmp_path / "odd", template=CHATML.replace("{% endfor %}", "{% endfor %} "))
    with pytest.raises(ValueError, match="line 1: the tokenizer's chat template does not render .* prefix by prefix"):
        TokenCorpus.from_chat(env["path"], tokenizer_path=str(odd), seq_len=32, cache_dir=str(tmp_path))


def _label(env, corpus, root):
    outs = [
        output_spec(uri=str(root / "topk"), representation="token_topk", k=K, value_dtype="float32"),
        output_spec(uri=str(root / "sampled"), representation="token_sampled", draws=DRAWS),
    ]
    return label_corpus_many(env["model"], corpus, outs, shard_size=2, batch_size=3, teacher=TEACHER)


@pytest.fixture(scope="module")
def labelled(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-labels")
    c = TokenCorpus.from_chat(env["path"], tokenizer_path=env["tok_dir"], seq_len=12, cache_dir=str(root / "cache"))
    _label(env, c, root)
    return {"corpus": c, "topk": str(root / "topk"), "sampled": str(root / "sampled"), "root": root}


def test_labels_are_stored_for_assistant_targets_only(env, labelled):
    c = labelled["corpus"]
    ds = storage.open_soft_labels(labelled["topk"])
    m = ds.manifest
    every = np.arange(len(c))
    assert m["num_tokens"] == c.num_positions < int(c.lengths(every).sum())
    assert m["data"]["inputs"]["chat"]["labelled_positions"] == c.num_positions
    # each window's stored rows are the teacher's top-k at its assistant targets, in order
    stored = ds.take_sequences(c.sample_ids)
    for j in range(len(c)):
        x = c.encode([j])[:, : int(c.lengths([j])[0])]
        with torch.no_grad():
            logp = F.log_softmax(env["model"](input_ids=x).logits[0].float(), -1)  # (n, V)
        at = torch.from_numpy(c.label_mask([j])[0, : x.shape[1]])
        top = logp[at].topk(K, dim=-1)
        n = int(stored["length"][j])
        assert n == int(at.sum())
        assert np.array_equal(stored["topk_ids"][j, :n], top.indices.numpy())
        np.testing.assert_allclose(stored["topk_logprobs"][j, :n], top.values.numpy(), atol=1e-5)
    sampled = storage.open_soft_labels(labelled["sampled"]).manifest
    assert sampled["num_tokens"] == c.num_positions


def test_stream_and_map_style_batches_put_rows_at_assistant_positions(env, labelled):
    c = labelled["corpus"]
    s = open_label_stream(labelled["topk"], c, batch_size=3, shuffle=False)
    ds = storage.open_soft_labels(labelled["topk"])
    data = TokenLabels(ds, c)
    for batch in s:
        sid = batch["sample_id"].numpy()
        stored = ds.take_sequences(sid)
        for j in range(len(sid)):
            m = batch["mask"][j]
            n = int(stored["length"][j])
            assert int(m.sum()) == n
            assert torch.equal(batch["topk_ids"][j][m], torch.from_numpy(stored["topk_ids"][j, :n]))
            assert (batch["topk_ids"][j][~m] == 0).all()
        mine = collate_tokens(data.__getitems__(list(c.index_of(sid))), pad_id=env["tok"].eos_token_id)
        for key in ("x", "y", "mask", "topk_ids", "topk_logprobs", "missing_mass"):
            assert torch.equal(mine[key], batch[key]), key


def test_losses_and_perplexity_count_assistant_tokens_only(env, labelled):
    c = labelled["corpus"]
    s = open_label_stream(labelled["topk"], c, batch_size=4, shuffle=False)
    batch = next(iter(s))
    V = len(env["tok"])
    torch.manual_seed(0)
    logits = torch.randn(*batch["x"].shape, V)
    m = batch["mask"]
    ce = Objective(loss="ce").terms(logits, batch)["loss"]
    want = F.cross_entropy(logits[m], batch["y"][m])  # by hand: assistant targets only
    assert float(ce) == pytest.approx(float(want), rel=1e-6)
    topk = {"kind": "token_topk", "stored_temperatures": [1.0]}
    kd = Objective(loss="topk_kl", **topk).terms(logits, batch)["loss"]
    other = logits.clone()
    other[~m] = torch.randn_like(other[~m]) * 10  # anything at unlabelled positions
    assert float(Objective(loss="ce").terms(other, batch)["loss"]) == pytest.approx(float(ce), rel=1e-6)
    assert float(Objective(loss="topk_kl", **topk).terms(other, batch)["loss"]) == pytest.approx(float(kd), rel=1e-6)
    # and the KD term by hand: sum over assistant positions of KL(teacher top-k + tail || student) / count
    logq = F.log_softmax(logits[m], -1)  # (M, V)
    p_top = batch["topk_logprobs"][m].exp()  # (M, K)
    q_top = logq.gather(1, batch["topk_ids"][m])
    miss = batch["missing_mass"][m]
    q_miss = (1 - q_top.exp().sum(1)).clamp_min(1e-12)
    kl = (p_top * (batch["topk_logprobs"][m] - q_top)).sum(1) + miss * (miss.clamp_min(1e-12).log() - q_miss.log())
    assert float(kd) == pytest.approx(float(kl.mean()), rel=1e-4)
    # perplexity: exp(mean CE over assistant targets), by hand over every window
    model = env["model"]
    total, count = 0.0, 0
    for j in range(len(c)):
        b = c.lm_batch([j])
        with torch.no_grad():
            z = model(input_ids=b["input_ids"]).logits.float()
        total += float(F.cross_entropy(z[b["mask"]], b["targets"][b["mask"]], reduction="sum"))
        count += int(b["mask"].sum())
    p = perplexity(model, c, batch_size=3)
    assert p["tokens"] == count == c.num_positions
    assert p["perplexity"] == pytest.approx(float(np.exp(total / count)), rel=1e-5)


def test_labels_made_with_another_template_are_refused(env, labelled, tmp_path):
    other = tiny_chat_tokenizer(tmp_path / "other", template=CHATML.replace("\n", " \n"))  # the same tokens
    c2 = TokenCorpus.from_chat(env["path"], tokenizer_path=str(other), seq_len=12, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="chat template .* but corpus .* chat template") as e:
        TokenLabels(labelled["topk"], c2)
    assert "\n" not in str(e.value)
    plain = TokenCorpus.from_text_files(
        _texts(tmp_path), tokenizer_path=env["tok_dir"], seq_len=12, cache_dir=str(tmp_path), windows="documents"
    )
    with pytest.raises(ValueError, match="no chat mask"):
        TokenLabels(labelled["topk"], plain)


def _texts(tmp_path):
    d = tmp_path / "texts"
    d.mkdir(exist_ok=True)
    (d / "a.txt").write_text("the dress is good and the fit is nice " * 3)
    return str(d)


def test_a_corpus_cache_is_reused_and_pickles_without_its_maps(env, tmp_path):
    import pickle

    c = TokenCorpus.from_chat(env["path"], tokenizer_path=env["tok_dir"], seq_len=12, cache_dir=str(tmp_path))
    files = sorted(os.listdir(tmp_path))
    assert any(f.endswith(".mask.npy") for f in files) and any(f.endswith(".turns.npy") for f in files)
    again = TokenCorpus.from_chat(env["path"], tokenizer_path=env["tok_dir"], seq_len=12, cache_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == files and again.fingerprint() == c.fingerprint()
    back = pickle.loads(pickle.dumps(c.split(seed=0, sizes={"train": 2, "val": 2})["train"]))
    assert np.array_equal(back.label_mask(np.arange(len(back))), c.label_mask(c.index_of(back.sample_ids)))


def test_labelled_all_keeps_every_position_and_is_its_own_lineage(env, labelled, tmp_path):
    every = TokenCorpus.from_chat(
        env["path"], tokenizer_path=env["tok_dir"], seq_len=12, cache_dir=str(tmp_path), labelled="all"
    )
    pos = np.arange(len(every))
    assert np.array_equal(every.label_counts(pos), every.lengths(pos))
    assert every.describe()["chat"]["labelled"].startswith("every position")
    assert every.fingerprint() != labelled["corpus"].fingerprint()
    with pytest.raises(
        ValueError, match=r"\(labelled assistant, too_long refuse\), but corpus .* \(labelled all, too_long refuse\)"
    ):
        TokenLabels(labelled["topk"], every)


CHAT_CFG = """
task: lm
name: c
corpus: {kind: chat, path: x.jsonl, seq_len: 64, sizes: {train: 2, val: 1}}
teacher: {gguf: x.gguf}
label: {topk: {k: 8}}
"""


@pytest.mark.parametrize(
    "override,what",
    [
        (
            ["corpus.kind=jsonl", "label.generate={answers: 2}"],
            "label.generate writes answers .* needs corpus.kind chat",
        ),
        (["students.data=[generated]"], "students.data has 'generated': set label.generate"),
        (["label.generate={answers: 0}"], "label.generate.answers"),
        (["label.generate={top_p: 0}"], "label.generate.top_p"),
        (["corpus.labelled=all", "label.generate={answers: 1}"], "needs corpus.labelled assistant"),
        (["students.models=[{arch: llama, losses: [nope]}]"], "unknown loss 'nope'"),
    ],
)
def test_chat_config_refusals_name_the_key(tmp_path, override, what):
    from flows.config import ConfigError, load_config

    p = tmp_path / "c.yaml"
    p.write_text(CHAT_CFG)
    with pytest.raises(ConfigError, match=what):
        load_config(str(p), override)


def test_generate_stop_strings_become_single_token_ids(env):
    from flows.lm import stop_ids

    tok = env["tok"]
    assert stop_ids({"dir": env["tok_dir"]}, ["<|im_end|>", "good"]) == [tok.eos_token_id, tok.get_vocab()["good"]]
    with pytest.raises(ValueError, match="label.generate.stop: 'good fit' is 2 tokens"):
        stop_ids({"dir": env["tok_dir"]}, ["good fit"])


def test_chitchat_asset_conversion():
    from flows.assets import chitchat_conversations

    raw = {
        "a": {  # two people: the first writer is the user; one sender's messages are one turn
            "messages": [
                [{"text": "hi", "sender": "p"}, {"text": "  ", "sender": "p"}, {"text": "you there", "sender": "p"}],
                [{"text": "yes", "sender": "q"}],
                [{"text": "ok", "sender": "q"}],  # the same sender again: the same turn
                [{"text": "bye", "sender": "p"}],
            ]
        },
        "b": {"messages": [[{"text": "alone", "sender": "p"}], [{"text": "still", "sender": "p"}]]},  # one person
        "c": {"messages": [[{"text": "x", "sender": "p"}], [{"text": " ", "sender": "q"}]]},  # the other said nothing
    }
    out = chitchat_conversations(raw)
    assert out == [
        {
            "id": "a",
            "messages": [
                {"role": "user", "content": "hi\nyou there"},
                {"role": "assistant", "content": "yes\nok"},
                {"role": "user", "content": "bye"},
            ],
        }
    ]


ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".assets", "chitchat.jsonl")


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isfile(ASSET), reason="`distill assets` (make setup) fetches the chitchat conversations"
)
def test_the_recipes_conversations_open_as_a_chat_corpus(env, tmp_path):
    """configs/chat.yaml's real data (4,017 conversations, ~34 turns, some messages longer than
    the recipe's seq_len) with a word-level ChatML tokenizer: every line parses, long
    conversations are cut between messages, the 256-token refusal names a real line."""
    c = TokenCorpus.from_chat(
        ASSET, tokenizer_path=env["tok_dir"], seq_len=256, cache_dir=str(tmp_path), too_long="skip"
    )
    chat = c.describe()["chat"]
    assert chat["conversations"] == 4017 and chat["skipped_without_assistant"] == 0
    assert 0 < chat["skipped_too_long"] < 200 and (c.lengths(np.arange(len(c))) <= 256).all()
    assert 0.2 < chat["labelled_share"] < 0.6
    parts = c.split(seed=0, sizes={"train": 60, "val": 10, "test": 40})
    assert len(set(c.conversations(c.index_of(parts["train"].sample_ids)))) == 60
    with pytest.raises(ValueError, match=r"chitchat.jsonl: line \d+: message \d+ takes \d+ tokens"):
        TokenCorpus.from_chat(ASSET, tokenizer_path=env["tok_dir"], seq_len=256, cache_dir=str(tmp_path))
