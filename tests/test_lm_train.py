"""The one training loop (pipeline/training/loop.py) on a language model, and the causal-LM
model seam (pipeline/models/causal_lm.py), on a tiny corpus and a tiny random Llama
teacher: perplexity against hand-computed cross-entropy, the schedule, equal steps for every
loss, determinism, a student that learns, resume by lineage, refusals."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny_hf import tiny_labelled_corpus

from pipeline.models.causal_lm import llama, perplexity
from pipeline.models.registry import build_model, param_counts
from pipeline.training.config import TrainConfig
from pipeline.training.loop import make_schedule, train

TEACHER = {"name": "tiny-llama", "fingerprint": "sha256:tiny"}
LM = dict(betas=(0.9, 0.95), min_lr=0.1, grad_clip=1.0, device="cpu")  # what configs/lm.yaml sets


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return tiny_labelled_corpus(tmp_path_factory.mktemp("lmtrain"))


def _student(env, seed=0):
    torch.manual_seed(seed)
    return build_model(
        {"arch": "llama", "kwargs": {"layers": 1, "hidden": 16, "heads": 2, "max_length": 16}},
        in_shape=(16,),
        num_classes=env["V"],
    )


def test_perplexity_is_exp_of_the_hand_computed_cross_entropy(env):
    m, val = _student(env), env["val"]
    got = perplexity(m, val, batch_size=3)
    w = torch.from_numpy(val.windows(np.arange(len(val))))
    with torch.no_grad():
        logits = m(w[:, :-1])  # the seam: ids -> (B, L, V)
    ce = F.cross_entropy(logits.reshape(-1, env["V"]).double(), w[:, 1:].reshape(-1)).item()
    assert got["tokens"] == len(val) * 16
    assert math.isclose(got["loss"], ce, rel_tol=1e-5) and math.isclose(got["perplexity"], math.exp(ce), rel_tol=1e-5)
    assert perplexity(m.model, val, batch_size=3) == got  # a bare Hugging Face model too


def test_student_factory_is_seeded_and_ties_embeddings(env):
    a, b, c = _student(env, 0), _student(env, 0), _student(env, 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], sc[k]) for k in sa)
    hf = a.model
    assert hf.get_input_embeddings().weight is hf.get_output_embeddings().weight
    assert param_counts(a)["params"] == sum(p.numel() for p in a.parameters())  # tied weights counted once
    assert hf.model.embed_tokens.padding_idx is None  # every token row learns (pad = separator)
    with pytest.raises(ValueError, match="divisible"):
        llama(num_classes=10, hidden=10, heads=3)


def test_learning_rate_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, min_lr=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_schedule(opt, cfg, total_steps=20)
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[20] == pytest.approx(0.1) and lrs[12] == pytest.approx(0.55)


@pytest.mark.parametrize(
    "loss,labels",
    [("ce", None), ("topk_kl", "topk"), ("sampled_kl", "sampled"), ("reverse_kl", "topk"), ("jsd", "topk")],
)
def test_every_loss_trains_with_equal_steps_and_is_deterministic(env, loss, labels, tmp_path):
    uri = None if labels is None else str(env["root"] / labels)
    cfg = TrainConfig(
        loss=loss,
        epochs=3,
        batch_size=4,
        lr=0.02,
        warmup_steps=2,
        seed=5,
        alpha=0.0,
        **LM,
        log_path=str(tmp_path / "log.jsonl"),
    )
    before = perplexity(_student(env), env["val"])["loss"]
    a_model = _student(env)
    a = train(a_model, cfg, train_data=env["train"], val_data=env["val"], labels=uri)
    b = train(_student(env), cfg, train_data=env["train"], val_data=env["val"], labels=uri)
    assert a["steps"] == 3 * 24 // 4 and a["units"] == 3 * 24 * 16 and a["unit"] == "tokens"
    assert a["metric"] == "perplexity" and a["best_val"] == b["best_val"]  # same seed, same student
    assert a["best_val"] == pytest.approx(perplexity(a_model, env["val"])["perplexity"])  # the best weights
    if loss == "ce":
        assert perplexity(a_model, env["val"])["loss"] < before  # it learned the text
    else:  # the teacher is random, not the text: the student learns the teacher
        assert _kl_to_teacher(env, a_model) < 0.9 * _kl_to_teacher(env, _student(env))
    assert [json.loads(x)["step"] for x in open(cfg.log_path)] == [6, 12, 18]


def _kl_to_teacher(env, m) -> float:
    """KL(teacher ‖ student) over every position of the validation windows, dense."""
    x = env["val"].encode(np.arange(len(env["val"])))
    with torch.no_grad():
        p = torch.log_softmax(env["teacher"](input_ids=x).logits, -1)
        q = torch.log_softmax(m(x), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_refusals(env):
    tr, va = env["train"], env["val"]
    with pytest.raises(ValueError, match="give stored labels= or an online teacher="):
        train(_student(env), TrainConfig(loss="topk_kl", **LM), train_data=tr)
    with pytest.raises(
        ValueError, match="loss='topk_kl' learns from topk labels, but soft labels at .* are token_sampled"
    ):
        train(_student(env), TrainConfig(loss="topk_kl", **LM), train_data=tr, labels=str(env["root"] / "sampled"))
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="kl")
    with pytest.raises(ValueError, match="defined only at the stored temperature 1"):
        train(
            _student(env),
            TrainConfig(loss="sampled_kl", temperature=2.0, **LM),
            train_data=tr,
            labels=str(env["root"] / "sampled"),
        )
    with pytest.raises(ValueError, match="fingerprint"):  # labels of other windows (the val split)
        train(_student(env), TrainConfig(loss="topk_kl", **LM), train_data=va, labels=str(env["root"] / "topk"))


def test_allocator_tuning_is_on_by_default_and_can_be_turned_off():
    import subprocess
    import sys

    code = "from pipeline.device import keep_large_blocks as k; print(k(), k())"
    env = dict(os.environ, DISTILLERY_MALLOC_TUNING="1")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    env["DISTILLERY_MALLOC_TUNING"] = "0"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert on.stdout.split() == ["True", "True"] and off.stdout.split() == ["False", "False"]


def test_a_language_model_student_killed_mid_epoch_resumes_to_the_same_weights(env, tmp_path):
    """Killed in the middle of epoch 1: the rerun continues from the epoch-0 checkpoint (the
    same total steps), and ends with exactly the weights of a run never interrupted."""
    uri = str(env["root"] / "topk")

    def cfg(name):
        return TrainConfig(
            loss="topk_kl",
            alpha=0.5,
            epochs=3,
            batch_size=4,
            lr=0.02,
            seed=3,
            **LM,
            log_path=str(tmp_path / f"{name}.jsonl"),
            ckpt_path=str(tmp_path / f"{name}.pt"),
        )

    ref = _student(env)
    r_ref = train(ref, cfg("ref"), train_data=env["train"], val_data=env["val"], labels=uri)

    class Killed(Exception):
        pass

    def kill(epoch, batch):
        kill.n = getattr(kill, "n", 0) + (epoch == 1)
        if kill.n > 2:
            raise Killed

    with pytest.raises(Killed):
        train(_student(env), cfg("run"), train_data=env["train"], val_data=env["val"], labels=uri, on_batch=kill)
    resumed = _student(env, seed=9)  # another init: everything comes from the checkpoint
    r = train(resumed, cfg("run"), train_data=env["train"], val_data=env["val"], labels=uri, resume=True)
    assert r["epochs_trained"] == 2 and r["steps"] == r_ref["steps"] == 18 and r["best_val"] == r_ref["best_val"]
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert [json.loads(x)["step"] for x in open(tmp_path / "run.jsonl")] == [6, 12, 18]


def test_language_model_students_in_parallel_threads_are_reproducible(env):
    """A sweep trains students in threads of one process: seeding and init hold one lock, so
    two students trained at once equal the same students trained one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.device import torch_threads
    from pipeline.training.student import run_student

    def one(seed):
        run = {
            "name": f"s{seed}",
            "model": {"arch": "llama", "kwargs": {"layers": 1, "hidden": 16, "heads": 2}},
            "loss": "topk_kl",
        }
        cfg = TrainConfig(loss="topk_kl", epochs=1, batch_size=4, lr=0.02, seed=seed, **LM)
        r = run_student(
            run=run,
            train_config=cfg,
            transfer=env["train"],
            labelled=env["train"],
            val=env["val"],
            checkpoint_path=str(env["root"] / f"par-{seed}.pt"),
            soft_labels=[str(env["root"] / "topk")],
            label_manifests=[{}],
            num_classes=env["V"],
            resume=False,
        )
        return {k: v.clone() for k, v in r.model.state_dict().items()}

    with torch_threads(1):
        alone = [one(s) for s in (1, 2)]
        with ThreadPoolExecutor(max_workers=2) as ex:
            together = list(ex.map(one, (1, 2)))
    for a, b in zip(alone, together):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(alone[0][k], alone[1][k]) for k in alone[0])  # the seeds differ
