"""Students trained by Hugging Face `Trainer` from stored labels (and through it accelerate:
DDP under torchrun, gradient accumulation, bf16, its loggers and checkpoints).

    trainer = DistillationTrainer(model=student, args=TrainingArguments(...),
                                  train_dataset=TokenLabels(labels, corpus), labels=labels,
                                  loss="topk_kl", alpha=0.5)
    trainer.train()

The loss is the built-in loop's (pipeline/objectives.Objective, one owner): compute_loss
runs the student on the batch and returns Objective.terms(logits, batch)["loss"]; the named
terms (task_loss, kd_loss) are logged beside Trainer's "loss". Batches are the built-in
loop's too (collate_tokens for windows, collate_rows for classifier rows), so the first
step's loss equals the built-in loop's on the same batch. Trainer samples a map-style
dataset itself (a DistributedSampler over ranks under torchrun).

`train_with_trainer` is the flows' entry (`trainer: hf` on a language-model student): the
same result dict as loop.train, best-validation weights kept, Trainer's own checkpoints
for resume (with the run's lineage beside them: another run's are not continued).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import default_collate
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

from pipeline.device import resolve_device
from pipeline.models.causal_lm import CausalLM
from pipeline.objectives.objective import Objective
from pipeline.tasks import task_of
from pipeline.training.config import TrainConfig
from pipeline.training.loop import append_jsonl, lineage_diff
from pipeline.training.stream import TOKEN_KINDS, verifier
from pipeline.training.windows import TokenLabels, Windows, collate_tokens
from storage import SoftLabelDataset, open_soft_labels

STATE_FILE = "distillery_state.pt"  # beside each Trainer checkpoint: best weights, history, lineage


def collate_rows(items: Sequence[tuple[Any, dict]], inputs_collator: Callable | None = None) -> dict:
    """distillery.StoredLabels items (input, label dict) -> {"x": the inputs collated by
    inputs_collator (default torch's; a tokenizer's DataCollatorWithPadding for text), the
    label fields stacked, "weight" ones}; an input dict's "label"/"labels" becomes "y"."""
    xs = [x for x, _ in items]
    x = (inputs_collator or default_collate)(xs)
    batch = {k: torch.stack([lab[k] for _, lab in items]) for k in items[0][1]}
    if isinstance(x, dict):
        x = dict(x)
        for key in ("labels", "label"):
            if key in x:
                batch["y"] = torch.as_tensor(x.pop(key))
    batch["x"], batch["weight"] = x, torch.ones(len(items), dtype=torch.float32)
    return batch


def forward_logits(model: nn.Module, batch: dict) -> Tensor:
    """The student's logits for a batch: a dict x is the model's keyword inputs (a tokenized
    classifier batch); token ids go in as input_ids with an all-ones attention mask, as the
    built-in loop feeds them (CausalLM): padding sits after each window's end, where causal
    attention keeps it out of every real position."""
    x = batch["x"]
    if isinstance(x, dict):
        return model(**x).logits
    inner = getattr(model, "module", model)  # DDP / accelerate wrappers
    if isinstance(inner, CausalLM):
        return model(x)
    return model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits


class DistillationTrainer(Trainer):
    """`Trainer` whose loss is distillery's Objective on stored labels (module doc).

    labels: the stored labels (open_labels or a URI; None with loss="ce"); loss: a
    registered KD loss (default: the labels' family's own) or "ce" (next-token / hard-label
    cross-entropy alone, the baseline); temperature: the student's T' (default: stored T);
    alpha: weight of the cross-entropy beside KD. data_collator defaults to collate_tokens
    (token labels, windows) or collate_rows (classifier rows). Everything else is Trainer's."""

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *,
        labels: SoftLabelDataset | str | None = None,
        loss: str | None = None,
        temperature: float | None = None,
        alpha: float = 0.0,
        on_batch: Callable[[int, dict], None] | None = None,
        **kw: Any,
    ):
        if isinstance(labels, str):
            labels = open_soft_labels(labels)
        if loss == "ce":
            self.objective = Objective(loss="ce")
        else:
            if labels is None:
                raise ValueError(f"DistillationTrainer: loss {loss!r} learns from stored labels: pass labels=")
            self.objective = Objective.for_labels(labels, loss=loss, temperature=temperature, alpha=alpha)
        tokens = labels is None or labels.manifest["representation"]["kind"] in TOKEN_KINDS
        if kw.get("data_collator") is None:
            kw["data_collator"] = collate_tokens if tokens else collate_rows
        if args is not None and args.remove_unused_columns:
            # the label columns are not the model's forward arguments: Trainer would drop them
            args.remove_unused_columns = False
        super().__init__(model=model, args=args, **kw)
        # the loss is a mean per batch, not a sum over num_items_in_batch: Trainer divides it
        # by the gradient-accumulation steps itself
        self.model_accepts_loss_kwargs = False
        self.label_names = ["y"]
        self.on_batch = on_batch
        self._sums: dict[str, float] = {}
        self.units = 0.0  # tokens (or rows) trained on, for throughput

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.on_batch is not None and model.training:
            self.on_batch(int(self.state.epoch or 0), inputs)
        logits = forward_logits(model, inputs)  # (B, C) or (B, L, V)
        terms = self.objective.terms(logits, inputs)
        if model.training:
            n = float(inputs["mask"].sum() if "mask" in inputs else inputs["weight"].sum())
            self.units += n
            for k, v in terms.items():
                if k != "loss":
                    self._sums[k] = self._sums.get(k, 0.0) + float(v.detach()) * n
            self._sums["_units"] = self._sums.get("_units", 0.0) + n
        return (terms["loss"], {"logits": logits}) if return_outputs else terms["loss"]

    def log(self, logs: dict[str, float], *args: Any, **kw: Any) -> None:
        # the named terms' means since the last log, beside Trainer's "loss"
        if "loss" in logs and self._sums.get("_units"):
            u = self._sums.pop("_units")
            logs.update({k: v / u for k, v in self._sums.items()})
            self._sums = {}
        super().log(logs, *args, **kw)


# ---------------------------------------------------------------- the flows' entry


def training_arguments(cfg: TrainConfig, output_dir: str, **overrides: Any) -> TrainingArguments:
    """A TrainConfig as TrainingArguments: the same optimizer, learning rate, betas, weight
    decay, warm-up, cosine to min_lr (Trainer's "cosine_with_min_lr"), gradient clipping,
    batch size, epochs, seed and DataLoader workers; a checkpoint every epoch."""
    if cfg.schedule == "step":
        raise ValueError("trainer: hf has no 'step' schedule: use schedule cosine or constant")
    if cfg.patience is not None:
        raise ValueError("trainer: hf does not stop early: leave patience unset")
    device = resolve_device(cfg.device)
    kw = dict(
        output_dir=output_dir,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,  # when set, Trainer stops there (that epoch is the last)
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1],
        optim="adamw_torch" if cfg.optimizer == "adamw" else "sgd",
        lr_scheduler_type="cosine_with_min_lr" if cfg.schedule == "cosine" else "constant_with_warmup",
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr} if cfg.schedule == "cosine" else {},
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.grad_clip or 0.0,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=cfg.num_workers,
        use_cpu=device.type == "cpu",
        logging_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    if cfg.optimizer == "sgd":
        kw["optim_args"] = f"momentum={cfg.momentum}"
    return TrainingArguments(**(kw | overrides))


class _Epochs(TrainerCallback):
    """Per epoch: validate (the task's metric), keep the best weights, write the log record
    the built-in loop writes; beside each checkpoint, what a resume needs of that."""

    def __init__(self, task, val_data, cfg: TrainConfig, lineage: dict | None, device):
        self.task, self.val_data, self.cfg, self.lineage, self.device = task, val_data, cfg, lineage, device
        self.best, self.best_epoch, self.best_state, self.history = None, None, None, []
        self.trainer: DistillationTrainer | None = None
        self.t0 = time.perf_counter()
        self.units0 = 0.0

    def restore(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.best_state, self.history = state["best_state"], state["history"]

    def on_epoch_begin(self, args, state, control, **kw):
        self.t0, self.units0 = time.perf_counter(), self.trainer.units

    def on_epoch_end(self, args, state, control, model=None, **kw):
        epoch = len(self.history)
        train_seconds = time.perf_counter() - self.t0
        units = self.trainer.units - self.units0
        val = None
        last = epoch + 1 == self.cfg.epochs or (args.max_steps > 0 and state.global_step >= args.max_steps)
        if self.val_data is not None and ((epoch + 1) % self.cfg.eval_every == 0 or last):
            if args.process_index == 0:
                val = self.task.score(self.trainer.model, self.val_data, device=self.device)
            better = self.best is None or (val > self.best if self.task.higher_is_better else val < self.best)
            if args.process_index == 0 and (better or val == self.best):
                self.best, self.best_epoch = val, epoch
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.trainer.model.state_dict().items()}
        logs = [h for h in state.log_history if "loss" in h]
        record = {
            "epoch": epoch,
            "step": state.global_step,
            "train_loss": None,  # filled from Trainer's log (written right after this callback)
            "val": val,
            "metric": self.task.metric,
            "lr": logs[-1].get("learning_rate") if logs else None,
            "seconds": time.perf_counter() - self.t0,
            "throughput": units / max(train_seconds, 1e-9),
            "unit": self.task.unit,
            "best_val": self.best,
            "units": units,
        }
        self.history.append(record)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs and self.history and self.history[-1]["train_loss"] is None:
            rec = self.history[-1]
            rec["train_loss"] = logs["loss"]
            rec.update({k: v for k, v in logs.items() if k.endswith("_loss")})
            if args.process_index == 0 and self.cfg.log_path:
                append_jsonl(self.cfg.log_path, [rec])

    def on_save(self, args, state, control, **kw):
        if args.process_index == 0:
            d = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            state_dict = {
                "best": self.best,
                "best_epoch": self.best_epoch,
                "best_state": self.best_state,
                "history": self.history,
                "lineage": self.lineage,
                "units": self.trainer.units,
            }
            tmp = os.path.join(d, STATE_FILE + ".tmp")
            torch.save(state_dict, tmp)
            os.replace(tmp, os.path.join(d, STATE_FILE))


def _resume_point(out_dir: str, lineage: dict | None) -> tuple[str | None, dict | None]:
    """The last Trainer checkpoint of this run and its distillery state, or (None, None):
    nothing there, or another run's (other data, labels, model, config: printed, removed)."""
    last = get_last_checkpoint(out_dir) if os.path.isdir(out_dir) else None
    if last is None:
        return None, None
    path = os.path.join(last, STATE_FILE)
    st = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None
    if st is None or st.get("lineage") != lineage:
        why = ", ".join(lineage_diff(st["lineage"], lineage)) + " differ" if st else "it has no distillery state"
        print(f"{out_dir}: not resuming, it belongs to another run ({why}); training from scratch")
        shutil.rmtree(out_dir, ignore_errors=True)
        return None, None
    return last, st


def train_with_trainer(
    model: nn.Module,
    cfg: TrainConfig,
    *,
    train_data: Any,
    val_data: Any = None,
    labels: str | None = None,
    transform: Any = None,
    num_views: int | None = None,
    storage_options: dict | None = None,
    expect: dict | None = None,
    public_key: str | bytes | None = None,
    resume: bool = True,
    lineage: dict | None = None,
    on_batch: Callable[[int, dict], None] | None = None,
) -> dict:
    """loop.train's contract (same arguments, same result dict, best-validation weights in
    `model` at the end) with Hugging Face Trainer doing the steps: language-model students
    (`trainer: hf`). Trainer's checkpoints live in cfg.ckpt_path + ".hf/"."""
    task = task_of(train_data)
    if task.name != "lm":
        raise ValueError("trainer: hf trains language-model students (task: lm); classifiers use the built-in loop")
    if transform is not None or (num_views or 1) > 1:
        raise ValueError("trainer: hf: language-model windows have no views")
    if cfg.hint_weight or cfg.rkd_weight:
        raise ValueError("trainer: hf has no hint/RKD losses: leave hint_weight and rkd_weight at 0")
    hard = cfg.loss == "ce"
    ds = None
    if not hard:
        if labels is None or not isinstance(labels, str):
            raise ValueError("trainer: hf learns from one stored-label dataset (labels=URI)")
        ds = open_soft_labels(labels, expect=expect, storage_options=storage_options, verifier=verifier(public_key))
    data = Windows(train_data) if hard else TokenLabels(ds, train_data)
    out_dir = (cfg.ckpt_path or os.path.join("runs", "hf-trainer")) + ".hf"
    device = resolve_device(cfg.device)
    hf_model = model.model if isinstance(model, CausalLM) else model
    epochs = _Epochs(task, val_data, cfg, lineage, device)
    trainer = DistillationTrainer(
        model=hf_model,
        args=training_arguments(cfg, out_dir),
        train_dataset=data,
        labels=ds,
        loss=cfg.loss,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        on_batch=on_batch,
        callbacks=[epochs],
    )
    epochs.trainer = trainer
    trainer.remove_callback(PrinterCallback)  # the flows show progress and write the epoch log themselves
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar per checkpoint
    last, st = _resume_point(out_dir, lineage) if resume else (None, None)
    if st is not None:
        epochs.restore(st)
        trainer.units = st["units"]
        print(f"{out_dir}: resuming from {os.path.basename(last)} ({len(st['history'])} of {cfg.epochs} epochs done)")
    if cfg.log_path and trainer.args.process_index == 0:  # the log always mirrors the checkpoint's history
        append_jsonl(cfg.log_path, epochs.history, truncate=True)
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - t0
    if epochs.best_state is not None:
        hf_model.load_state_dict(epochs.best_state)
    hist = epochs.history
    train_s = sum(h["seconds"] for h in hist)
    return {
        "metric": task.metric,
        "best_val": epochs.best,
        "best_epoch": epochs.best_epoch,
        "epochs_run": len(hist),
        "epochs_trained": len(hist) - (len(st["history"]) if st else 0),
        "steps": out.global_step,
        "units": sum(h["units"] for h in hist),
        "unit": task.unit,
        "stopped_early": False,
        "seconds": seconds,
        "throughput": sum(h["units"] for h in hist) / train_s if train_s else 0.0,
        "history": cfg.log_path,
        "last_epoch": hist[-1] if hist else None,
        "trainer": "hf",
    }
