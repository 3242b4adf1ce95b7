"""What runs in each Ray Train worker: build the TRL trainer, train (or resume), save.

``train_loop`` is the ``TorchTrainer``'s loop. It builds the stage's TRL trainer
(``build_trainer(job)`` of the stage module, which fixes its step budget with ``set_budget``:
``max_steps`` or ``num_train_epochs``, the smaller wins), adds ``RayReport`` (metrics -> ``ray.train.report``
on every log, the HF checkpoint -> a Ray ``Checkpoint`` on every save) and, when Ray restarted
it after a failure, resumes the HF trainer from the last reported checkpoint: weights,
optimizer, scheduler, step and logs. Rank 0 then writes ``adapter/`` (LoRA, with the
tokenizer), ``merged/`` (base + adapter, with the tokenizer: what the next stage loads), the
stage's final metrics (``finish``, on the merged model) and ``metrics.json``.

Tracking is transformers' own: ``report_to`` names its callbacks (TensorBoard, MLflow, W&B),
which log on rank 0 only; TensorBoard writes ``<stage>/tensorboard/`` (``TENSORBOARD_LOGGING_DIR``,
the variable its callback reads). ``trl_args`` are merged over hetray's keywords into the TRL
config (``trl_config``); the config check refused every key hetray sets itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from transformers import PrinterCallback, TrainerCallback

from hetray.models import CAUSAL, SEQ_CLS, load_model
from hetray.train.driver import STAGE_MODEL_DIR, TENSORBOARD_DIR, StageJob

log = logging.getLogger(__name__)


def lora_config(lora, head: str = CAUSAL):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="SEQ_CLS" if head == SEQ_CLS else "CAUSAL_LM",  # SEQ_CLS also trains the score head
    )


def short_prompts(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """The prompt rows whose prompt (as the model sees it) fits in ``max_length`` tokens."""
    def length(prompt) -> int:
        if isinstance(prompt, list):
            return len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
        return len(tokenizer(prompt)["input_ids"])

    kept = [r for r in rows if length(r["prompt"]) <= max_length]
    if not kept:
        raise ValueError(f"no prompt fits in max_length={max_length} tokens")
    return kept


def world_size() -> int:
    """Training processes (Ray Train workers); 1 outside a process group."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


@dataclass
class Budget:
    """A stage's training budget: optimizer steps (PPO: updates), and what an epoch is.

    ``rows`` is what one epoch passes over (the training rows after the trainer's own
    filtering or packing; PPO: the prompts; RLOO: prompts x num_generations completions) and
    ``rows_per_step`` what one step consumes over all workers (per-device batch x gradient
    accumulation x workers)."""

    rows: int
    rows_per_step: int
    max_steps: int  # the effective budget

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.rows / self.rows_per_step))

    def epochs_seen(self, steps: int) -> float:
        return steps * self.rows_per_step / self.rows


def plan_budget(max_steps: int | None, num_train_epochs: float | None, rows: int, rows_per_step: int) -> Budget:
    """The smaller of ``max_steps`` and ``num_train_epochs`` epochs (``None``: that one does not
    limit; at least one is set). An epoch is ``ceil(rows / rows_per_step)`` steps, and a
    fraction of epochs rounds up, as the transformers Trainer counts them."""
    if rows < 1:
        raise ValueError("no training rows")
    limits = [] if max_steps is None else [max_steps]
    if num_train_epochs is not None:
        per_epoch = max(1, math.ceil(rows / rows_per_step))
        limits.append(max(1, math.ceil(round(num_train_epochs * per_epoch, 6))))
    if not limits:
        raise ValueError("set max_steps or num_train_epochs")
    return Budget(rows=rows, rows_per_step=rows_per_step, max_steps=min(limits))


def set_budget(trainer, job: StageJob, rows: int, rows_per_step: int | None = None):
    """Fix a transformers Trainer's ``max_steps`` to the stage's budget (kept on the trainer as
    ``budget``, for ``metrics.json``). Default ``rows_per_step``: batch x accumulation x workers."""
    s = job.settings
    per_step = rows_per_step or s.per_device_batch_size * s.gradient_accumulation_steps * world_size()
    trainer.budget = plan_budget(s.max_steps, s.num_train_epochs, rows, per_step)
    trainer.args.max_steps = trainer.budget.max_steps  # read when train() starts (steps, schedule, warm-up)
    return trainer


def merge_adapter(base: str, adapter_dir: Path, out_dir: Path, head: str, tokenizer) -> None:
    """base + LoRA -> a plain HF checkpoint (with the tokenizer) that the next stage loads."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base, head), str(adapter_dir))
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def plot_history(history: list[dict], path: Path, stage: str) -> None:
    """One panel per curve that was logged: loss, learning rate, and the stage's own metrics."""
    from hetray.plots import figure, save  # here, not at the top: workers never plot (matplotlib is slow to import)

    wanted = ["loss", "learning_rate", "accuracy", "rewards/accuracies", "objective/scores",
              "objective/kl", "reward", "kl", "loss/policy_avg", "eval_accuracy"]
    curves = {k: [(h["step"], h[k]) for h in history if k in h and "step" in h] for k in wanted}
    curves = {k: v for k, v in curves.items() if v}
    fig, axes = figure(1, max(1, len(curves)), size=(4 * max(1, len(curves)), 3))
    for ax, (k, pts) in zip(axes[0], curves.items()):
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".")
        ax.set_title(k)
        ax.set_xlabel("step")
    save(fig, path, dpi=80, title=f"train {stage}")


def training_args(job: StageJob) -> dict:
    """TrainingArguments keywords every TRL config takes, from the stage's settings."""
    import torch

    s = job.settings
    precision = s.precision
    if precision == "auto":
        precision = "bf16" if job.use_gpu and torch.cuda.is_bf16_supported() else "fp32"
    return dict(
        output_dir=str(Path(job.work_dir) / "hf"),
        max_steps=s.max_steps or -1,  # set_budget fixes it once the trainer knows its rows
        num_train_epochs=s.num_train_epochs or 1.0,
        per_device_train_batch_size=s.per_device_batch_size,
        per_device_eval_batch_size=s.per_device_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_ratio,  # a float < 1 is a share of max_steps
        weight_decay=s.weight_decay,
        logging_steps=s.logging_steps,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=max(1, s.keep_checkpoints),  # while training; the driver keeps the last N at the end
        seed=job.seed,
        data_seed=job.seed,
        report_to=list(job.report_to) or "none",
        run_name=job.run_name,
        use_cpu=not job.use_gpu,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=s.gradient_checkpointing,
        deepspeed=job.deepspeed,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        disable_tqdm=True,  # one log line per logging step instead of a bar per worker
    )


def trl_config(cls, job: StageJob, **stage_kwargs):
    """The stage's TRL config: hetray's TrainingArguments keywords, the stage's own, then
    ``trl_args`` over both (the config check refused the keys hetray sets, so nothing of
    hetray's is overridden; trl_args win over hetray's fixed defaults such as ``disable_tqdm``)."""
    return cls(**{**training_args(job), **stage_kwargs, **job.settings.trl_args})


def trl_record(args, job: StageJob) -> dict:
    """What the manifest records of the TRL config: its class and the trl_args as it holds them."""
    def plain(v):
        return v.value if isinstance(v, Enum) else v

    cls = type(args)
    return {"class": f"{cls.__module__.split('.')[0]}.{cls.__name__}",
            "trl_args": {k: plain(getattr(args, k)) for k in job.settings.trl_args}}


class RayReport(TrainerCallback):
    """Every log -> ``ray.train.report``; every save -> a Ray Checkpoint.

    ``ray.train.report`` is a barrier, so every rank calls it as often (HF calls on_log and
    on_save on every rank). Rank 0 reports the whole HF checkpoint folder; the other ranks
    report only their own files (RNG state, DeepSpeed shards), which Ray merges into it. Each
    log also carries the step budget and the seconds per step so far, for the driver's
    console line (``hetray.train.progress``).
    """

    started, first_step = None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.monotonic(), None

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step is None:  # here, not at train begin: a resumed PPO sets its step after that
            self.first_step = state.global_step - 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        import ray.train

        done = state.global_step - (self.first_step if self.first_step is not None else state.global_step)
        pace = (time.monotonic() - self.started) / done if done > 0 and self.started else None
        ray.train.report({**_scalars(logs or {}), "step": state.global_step, "max_steps": state.max_steps,
                          **({"s_per_step": pace} if pace else {})})

    def on_save(self, args, state, control, **kwargs):
        import ray.train

        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        rank = ray.train.get_context().get_world_rank()
        with _own_files(ckpt, rank) as folder:
            checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
            ray.train.report({"step": state.global_step, "checkpoint_step": state.global_step},
                             checkpoint=checkpoint)


def _scalars(logs: dict) -> dict:
    return {k: v for k, v in logs.items() if isinstance(v, (int, float))}


class _own_files:
    """Rank 0: the checkpoint folder itself. Rank r: a temp copy of the files whose names
    carry the rank (``rng_state_1.pth``, ``..._rank_1_...``); None when there are none."""

    def __init__(self, ckpt: Path, rank: int):
        self.ckpt, self.rank, self.tmp = ckpt, rank, None

    def __enter__(self):
        if self.rank == 0:
            return str(self.ckpt)
        mine = re.compile(rf"(_{self.rank}\.|rank_{self.rank}_)")
        files = [p for p in self.ckpt.rglob("*") if p.is_file() and mine.search(p.name)]
        if not files:
            return None
        self.tmp = tempfile.mkdtemp(prefix=f"hetray-rank{self.rank}-")
        for p in files:
            dest = Path(self.tmp) / p.relative_to(self.ckpt)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest)
        return self.tmp

    def __exit__(self, *exc):
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker: build the TRL trainer, train (or resume), save."""
    import ray.train

    job: StageJob = config["job"]
    if not job.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU (before it is imported)
    # transformers' TensorBoard callback reads its folder from here (TrainingArguments has no logging_dir in v5)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(job.out_dir) / TENSORBOARD_DIR)
    os.environ.update(job.tracker_env)  # MLflow / W&B set up as on the driver, whenever Ray started
    _quiet_ray_reports()
    rank = ray.train.get_context().get_world_rank()
    _note_pid(job, rank)
    if job.deepspeed:  # let DeepSpeed adopt Ray's process group (ZeRO-3 builds the model sharded)
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if job.use_gpu else "gloo")
    trainer = config["build"](job)
    trainer.remove_callback(PrinterCallback)  # a dict per log per worker; the driver prints one line instead
    trainer.add_callback(RayReport())
    train = config.get("train", hf_train)
    checkpoint = ray.train.get_checkpoint()
    resumed_from = None
    if checkpoint is None:
        train(trainer, None)
    else:
        with checkpoint.as_directory() as folder:
            resumed_from = json.loads((Path(folder) / "trainer_state.json").read_text())["global_step"]
            log.warning("train %s: rank %d resumes from the checkpoint at step %d", job.stage, rank, resumed_from)
            train(trainer, folder)
    config.get("save", hf_save)(trainer, str(Path(job.out_dir) / "adapter"))
    if rank == 0:
        _write_outputs(trainer, job, resumed_from, config.get("finish"))


def _quiet_ray_reports() -> None:
    """Ray Train logs "Reporting training result ..." (every metric) and "Checkpoint
    successfully created at ..." at INFO on every worker for every report; the driver prints
    one readable line instead. The first logger is named after its module's file."""
    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:  # another Ray: its chatter stays
        return
    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def hf_train(trainer, checkpoint_dir: str | None) -> None:
    """A transformers Trainer resumes everything (weights, optimizer, step, logs) by itself."""
    trainer.train(resume_from_checkpoint=checkpoint_dir)


def hf_save(trainer, folder: str) -> None:
    """The LoRA adapter; every rank calls it (ZeRO-3 gathers), the main process writes."""
    trainer.save_model(folder)


def _note_pid(job: StageJob, rank: int) -> None:
    """One line per (re)start: the worker's pid, so a test (or a person) can find it."""
    folder = Path(job.work_dir) / "pids"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank{rank}.pid", "a") as f:
        f.write(f"{os.getpid()}\n")


def _write_outputs(trainer, job: StageJob, resumed_from, finish=None) -> None:
    """Rank 0: the tokenizer beside the adapter, the merged checkpoint, the final metrics
    (``finish(trainer, job, merged_dir) -> dict``, e.g. the reward model's held-out accuracy)
    and the metrics history."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # else ZeRO-3 would shard the merge's model loads over ranks that are done
    out = Path(job.out_dir)
    trainer.processing_class.save_pretrained(out / "adapter")  # an adapter loads on its own (PPO saves none)
    merge_adapter(job.model, out / "adapter", out / STAGE_MODEL_DIR, job.head, trainer.processing_class)
    final = finish(trainer, job, out / STAGE_MODEL_DIR) if finish else {}
    budget = getattr(trainer, "budget", None)  # None: a trainer built without set_budget (benchmarks)
    metrics = {
        "stage": job.stage,
        "global_step": trainer.state.global_step,
        "resumed_from_step": resumed_from,
        "rows": len(trainer.train_dataset) if trainer.train_dataset is not None else None,
        "budget": None if budget is None else {
            **asdict(budget), "steps_per_epoch": budget.steps_per_epoch,
            "epochs_seen": budget.epochs_seen(trainer.state.global_step)},
        "final": final,
        "trl_config": trl_record(trainer.args, job),
        "history": [dict(h) for h in trainer.state.log_history],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
