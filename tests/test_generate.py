"""Teacher-written answers (issue 22, label.generate): seeded, batched generation with the
key/value cache, every written token stored with its labels and the token itself. Checked
against a plain forward over prompt + answer (no cache, no padding), a token-by-token greedy
decode, other batch sizes, a killed and resumed run, and the students' batches over them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny_hf import tiny_chat_tokenizer

import pipeline.hf_files  # noqa: F401  (offline mode before transformers)
import storage
from pipeline.data.corpus import TokenCorpus
from pipeline.data.generated import generated_corpus
from pipeline.labelling.generate import GenerationLabeller
from pipeline.labelling.loop import label
from pipeline.labelling.tokens import output_spec
from pipeline.objectives.objective import Objective
from pipeline.training.stream import open_label_stream

TEACHER = {"name": "tiny-llama", "fingerprint": "sha256:tiny-llama-0"}
K, DRAWS, G = 8, 16, 10


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from test_chat import _jsonl
    from test_lm_label import tiny_llama

    from pipeline.hf_files import load_tokenizer

    root = tmp_path_factory.mktemp("gen")
    tok_dir = str(tiny_chat_tokenizer(root / "tok"))
    tok = load_tokenizer(tok_dir)
    corpus = TokenCorpus.from_chat(_jsonl(root / "c.jsonl"), tokenizer_path=tok_dir, seq_len=64, cache_dir=str(root))
    return {"root": root, "tok": tok, "corpus": corpus, "model": tiny_llama(len(tok))}


def _outputs(root):
    return [
        output_spec(uri=str(root / "topk"), representation="token_topk", k=K, value_dtype="float32"),
        output_spec(uri=str(root / "sampled"), representation="token_sampled", draws=DRAWS),
    ]


def _generate(env, root, *, progress=None, **kw):
    args = dict(answers=2, max_new_tokens=G, temperature=1.0, top_p=0.9, seed=0, batch_size=3) | kw
    lab = GenerationLabeller(env["model"], env["corpus"], _outputs(root), **args)
    label(lab, shard_size=3, teacher=TEACHER, progress=progress)
    return storage.open_soft_labels(str(root / "topk"), verify=True), lab


@pytest.fixture(scope="module")
def written(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("written")
    ds, lab = _generate(env, root)
    return {"root": root, "ds": ds, "lab": lab}


def _answers(ds):
    b = ds.take_sequences(np.arange(ds.manifest["num_samples"]))
    return [b["token"][i, : int(b["length"][i])] for i in range(len(b["length"]))], b


def test_stored_labels_are_the_teachers_distribution_at_each_written_token(env, written):
    answers, b = _answers(written["ds"])
    lab = written["lab"]
    assert len(answers) == 4 * 2  # 4 prompts (conversations with an answer) x 2 answers
    for i, a in enumerate(answers):
        p = lab.inputs.prompt(i)
        x = torch.from_numpy(np.concatenate([p, a]))[None]  # prompt + answer, one plain forward
        with torch.no_grad():
            logp = F.log_softmax(env["model"](input_ids=x).logits[0].float(), -1)  # (P + n, V)
        at = logp[len(p) - 1 : len(p) - 1 + len(a)]  # the distribution each written token came from
        top = at.topk(K, -1)
        assert np.array_equal(b["topk_ids"][i, : len(a)], top.indices.numpy())
        np.testing.assert_allclose(b["topk_logprobs"][i, : len(a)], top.values.numpy(), atol=2e-5)
        np.testing.assert_allclose(b["missing_mass"][i, : len(a)], 1 - top.values.exp().sum(-1).numpy(), atol=2e-5)


def test_answers_stop_at_a_stop_token_or_the_budget(env, written):
    stop = env["tok"].eos_token_id
    answers, _ = _answers(written["ds"])
    for a in answers:
        assert 1 <= len(a) <= G
        assert stop not in a[:-1].tolist()  # nothing after the first stop
        assert a[-1] == stop or len(a) == G
    assert written["ds"].manifest["num_tokens"] == sum(len(a) for a in answers)


def test_greedy_answers_equal_a_token_by_token_decode(env, tmp_path):
    ds, lab = _generate(env, tmp_path, temperature=0.0)
    answers, _ = _answers(ds)
    stop = env["tok"].eos_token_id
    for i, a in enumerate(answers):
        seq = list(lab.inputs.prompt(i))
        want = []
        for _ in range(G):  # no cache, no padding: the argmax of a full forward each step
            with torch.no_grad():
                t = int(env["model"](input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            want.append(t)
            seq.append(t)
            if t == stop:
                break
        assert a.tolist() == want
    # a nucleus this small keeps only the most probable token: sampling is greedy
    ds2, _ = _generate(env, tmp_path / "p", top_p=1e-9)
    assert [a.tolist() for a in _answers(ds2)[0]] == [a.tolist() for a in answers]


def test_answers_depend_on_prompt_answer_and_seed_not_on_the_batch(env, written, tmp_path):
    ones, _ = _generate(env, tmp_path / "b1", batch_size=1)
    base = [a.tolist() for a in _answers(written["ds"])[0]]
    assert [a.tolist() for a in _answers(ones)[0]] == base
    other, _ = _generate(env, tmp_path / "s1", seed=1)
    assert [a.tolist() for a in _answers(other)[0]] != base
    assert base[0] != base[1] or base[2] != base[3]  # two answers to one prompt differ


def test_a_killed_generation_resumes_to_the_same_bytes(env, written, tmp_path):
    class Killed(Exception):
        pass

    def die(stats):
        raise Killed

    with pytest.raises(Killed):
        _generate(env, tmp_path, progress=die)  # stopped after the first shard is committed
    ds, _ = _generate(env, tmp_path)
    for layout in ("topk", "sampled"):
        a = storage.open_soft_labels(str(tmp_path / layout)).shards
        b = storage.open_soft_labels(str(written["root"] / layout)).shards
        assert len(a) == 3 and [s["sha256"] for s in a] == [s["sha256"] for s in b]


def test_the_manifest_records_the_settings(written):
    m = written["ds"].manifest
    g = m["data"]["generation"]
    assert (g["answers"], g["max_new_tokens"], g["temperature"], g["top_p"], g["seed"]) == (2, G, 1.0, 0.9, 0)
    assert g["prompts"] == 4 and m["representation"]["tokens"] is True
    assert m["extra"]["generation"]["max_new_tokens"] == G
    assert m["seq_len"] == G and m["num_samples"] == 8


def test_max_new_tokens_beyond_the_context_is_refused(env, tmp_path):
    with pytest.raises(ValueError, match=r"label.generate.max_new_tokens 60 \+ the longest prompt's \d+ tokens exceed"):
        GenerationLabeller(env["model"], env["corpus"], _outputs(tmp_path), max_new_tokens=60)
    assert not (tmp_path / "topk").exists()


def test_students_read_prompt_plus_answer_with_the_answer_as_targets(env, written):
    g = generated_corpus(written["ds"], env["corpus"], cache_dir=str(written["root"] / "cache"))
    answers, _ = _answers(written["ds"])
    assert len(g) == len(answers) and g.num_positions == sum(len(a) for a in answers)
    s = open_label_stream(str(written["root"] / "topk"), g, batch_size=4, shuffle=False)
    batch = next(iter(s))
    for j, sid in enumerate(batch["sample_id"].tolist()):
        m = batch["mask"][j]
        assert batch["y"][j][m].tolist() == answers[sid].tolist()  # targets: the written tokens only
        p = written["lab"].inputs.prompt(sid)
        assert batch["x"][j, : len(p)].tolist() == p.tolist()
    # sequence-level KD: CE over the written tokens, by hand
    torch.manual_seed(0)
    z = torch.randn(*batch["x"].shape, len(env["tok"]))
    m = batch["mask"]
    ce = Objective(loss="ce").terms(z, batch)["loss"]
    assert float(ce) == pytest.approx(float(F.cross_entropy(z[m], batch["y"][m])), rel=1e-6)
    # the written answers' labels never pair with the human conversations, nor the reverse
    with pytest.raises(ValueError, match="answers the teacher wrote"):
        open_label_stream(str(written["root"] / "topk"), env["corpus"], batch_size=4)


def test_a_dataset_storing_tokens_refuses_rows_without_them(tmp_path):
    w = storage.SoftLabelWriter(
        str(tmp_path / "ds"),
        representation="token_topk",
        k=2,
        vocab_size=16,
        seq_len=4,
        teacher=TEACHER,
        data={"name": "x", "split": "all", "fingerprint": "sha256:x", "transform": None},
        backend="parquet",
        store_tokens=True,
    )
    ids = np.array([[1, 2], [3, 4]])
    lp = np.log(np.full((2, 2), 0.25))
    with pytest.raises(storage.InvalidLogitsError, match="tokens= .* is required"):
        w.write_shard(0, [7], ids=ids, logprobs=lp, missing_mass=np.full(2, 0.5), positions=[0, 1])
    with pytest.raises(storage.InvalidLogitsError, match="tokens: row 1 .* is 16, outside"):
        w.write_shard(0, [7], ids=ids, logprobs=lp, missing_mass=np.full(2, 0.5), positions=[0, 1], token=[3, 16])
    w.write_shard(0, [7], ids=ids, logprobs=lp, missing_mass=np.full(2, 0.5), positions=[0, 1], token=[3, 5])
    w.finalize()
    b = storage.open_soft_labels(str(tmp_path / "ds"), verify=True).take_sequences([7], [0])
    assert b["token"][0, :2].tolist() == [3, 5]


def test_prompts_at_every_answer_end_at_each_assistant_header(env):
    c, v = env["corpus"], env["tok"].get_vocab()
    conv_f, first = c.prompts("first")
    conv_e, every = c.prompts("every")
    assert len(every) == 8  # the assistant messages of the four conversations (test_chat.CONVS)
    for p in every:
        assert p[-2:].tolist() == [v["<|im_start|>"], v["assistant"]]  # ends at the answer's header
    # each conversation's first prompt is its "first" prompt; later ones extend it
    for cid, p in zip(conv_f, first):
        mine = [q for k, q in zip(conv_e, every) if k == cid]
        assert mine[0].tolist() == p.tolist()
        assert all(len(a) < len(b) and b[: len(a)].tolist() == a.tolist() for a, b in zip(mine, mine[1:]))
    lab = GenerationLabeller(env["model"], c, _outputs(env["root"] / "e"), prompts_at="every", max_new_tokens=G)
    assert len(lab.inputs) == 8 and lab.data()["generation"]["prompts_at"] == "every"
    other = GenerationLabeller(env["model"], c, _outputs(env["root"] / "f"), max_new_tokens=G)
    assert lab.inputs.fingerprint() != other.inputs.fingerprint()
