"""What every training stage shares: data as TRL wants it, LoRA, checks, and Ray Train.

A stage module (``sft.py``, ``reward.py``, ...) plans its run with ``plan_stage`` (which
already fails on missing data, a missing upstream stage or an unknown model) and hands
``run_stage`` a ``build_trainer(job)`` function. ``run_stage`` then, on the driver:

1. skips the stage when its manifest matches (same config, same inputs);
2. checks the rest before anything starts (``validate``): LoRA target modules, the DeepSpeed
   file, and that the Ray cluster has the CPUs / GPUs asked for;
3. runs a ``TorchTrainer`` (gloo on CPU, NCCL on GPU). Each worker builds the TRL trainer,
   adds ``RayReport`` (metrics -> ``ray.train.report`` on every log, the HF checkpoint -> a Ray
   ``Checkpoint`` on every save) and, when Ray restarted it after a failure, resumes the HF
   trainer from the last reported checkpoint: weights, optimizer, scheduler, step and logs;
4. rank 0 writes ``adapter/`` (LoRA), ``merged/`` (base + adapter, with the tokenizer: what the
   next stage loads) and ``metrics.json`` into a work folder; the driver adds ``loss.png`` and
   ``manifest.json`` and moves it to ``<run_dir>/<stage>/``.

Workers read the data and write the outputs under ``run_dir`` directly, so on a multi-node
cluster ``run_dir`` must be on storage that every node sees (as Ray's ``storage_path`` must).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from hetray import stage as mf
from hetray.schema import make_id, prompt_id
from hetray.unify.summary import parquet_files

log = logging.getLogger(__name__)

CAUSAL, SEQ_CLS = "causal", "seq_cls"  # the two model heads a stage trains
STAGE_MODEL_DIR = "merged"


class TrainSetupError(ValueError):
    """A training setting that cannot work; raised before Ray Train starts."""


@dataclass
class StageJob:
    """Everything a worker needs, pickled to each Ray Train worker."""

    stage: str
    settings: Any  # the stage's *Settings (pydantic)
    model: str  # checkpoint the stage starts from (folder or hub id)
    head: str  # CAUSAL or SEQ_CLS
    data_dir: str  # pairs (selected/ or preferences/)
    work_dir: str  # <run_dir>/.<stage>-work: hf/ checkpoints, out/, pids/
    seed: int
    use_gpu: bool
    deepspeed: str | None
    extra: dict = field(default_factory=dict)  # stage-specific: sft_only dir, reward model, ...

    @property
    def out_dir(self) -> Path:
        return Path(self.work_dir) / "out"


# ---------------------------------------------------------------------------- data


def pairs_dir(cfg) -> Path:
    """The pairs to train on: ``train.data`` (selected/), or preferences/ when it is absent."""
    run_dir = Path(cfg.run_dir)
    for name in dict.fromkeys([cfg.train.data, "preferences"]):
        if parquet_files(run_dir / name):
            return (run_dir / name).resolve()
    raise TrainSetupError(
        f"no pairs to train on in {run_dir}/{cfg.train.data} or {run_dir}/preferences: "
        "run `hetray convert` (and `hetray select`) first")


def read_table(folder: str | os.PathLike, columns: list[str]) -> pa.Table:
    files = parquet_files(folder)
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)


def _user(text: str, chat: bool):
    return [{"role": "user", "content": text}] if chat else text


def _assistant(text: str, chat: bool):
    return [{"role": "assistant", "content": text}] if chat else " " + text


def sft_rows(data_dir, sft_only_dir=None, chat: bool = True) -> list[dict]:
    """prompt + chosen of every pair (and prompt + response of sft_only/), as TRL's
    prompt-completion format: chat turns when ``chat``, else plain strings."""
    pairs = read_table(data_dir, ["prompt", "chosen"]).to_pylist()
    rows = [(p["prompt"], p["chosen"]) for p in pairs]
    if sft_only_dir is not None:
        rows += [(r["prompt"], r["response"]) for r in read_table(sft_only_dir, ["prompt", "response"]).to_pylist()]
    return [{"prompt": _user(p, chat), "completion": _assistant(c, chat)} for p, c in rows]


def pair_rows(data_dir, chat: bool = True) -> list[dict]:
    """prompt / chosen / rejected, with ``prompt_id`` (hash of the prompt) for held-out splits."""
    pairs = read_table(data_dir, ["prompt", "chosen", "rejected"]).to_pylist()
    return [
        {"prompt_id": prompt_id(p["prompt"]), "prompt": _user(p["prompt"], chat),
         "chosen": _assistant(p["chosen"], chat), "rejected": _assistant(p["rejected"], chat)}
        for p in pairs
    ]


def prompt_rows(data_dir, chat: bool = True) -> list[dict]:
    """Each distinct prompt once (for PPO / RLOO rollouts), in first-seen order."""
    prompts = dict.fromkeys(read_table(data_dir, ["prompt"])["prompt"].to_pylist())
    return [{"prompt": _user(p, chat)} for p in prompts]


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


def held_out(key: str, fraction: float, seed: int) -> bool:
    """Deterministic split by a seeded hash (of a prompt id): same on every worker and run."""
    return int(make_id(key, str(seed)), 16) / 16**16 < fraction


def uses_chat(tokenizer, wanted: bool = True) -> bool:
    return wanted and bool(getattr(tokenizer, "chat_template", None))


# ---------------------------------------------------------------------------- models


def lora_config(lora, head: str = CAUSAL):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="SEQ_CLS" if head == SEQ_CLS else "CAUSAL_LM",  # SEQ_CLS also trains the score head
    )


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, head: str):
    """A causal LM or a one-label sequence classifier (the reward / value head) from ``path``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if head == SEQ_CLS:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(path).pad_token_id
    return model


def linear_module_names(model_path: str) -> list[str]:
    """Names (last component) of every Linear layer, from the config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def merge_adapter(base: str, adapter_dir: Path, out_dir: Path, head: str, tokenizer) -> None:
    """base + LoRA -> a plain HF checkpoint (with the tokenizer) that the next stage loads."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base, head), str(adapter_dir))
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------- checks


def resolve_base(name: str) -> str:
    """The base LLM as a local folder or hub id; an unknown name fails with the model named."""
    from hetray.models import check_model, resolve_llm

    check_model(name)  # raises ModelNotFoundError (a ValueError) naming the model
    return resolve_llm(name)


def validate(cfg, job: StageJob) -> None:
    """Fail before Ray Train starts: LoRA targets, DeepSpeed file, data, cluster size."""
    import ray

    lora = job.settings.lora
    available = linear_module_names(job.model)
    missing = [m for m in lora.target_modules if m not in available]
    if missing:
        raise TrainSetupError(
            f"train.{job.stage}.lora.target_modules: {', '.join(missing)} not found in {job.model}; "
            f"its Linear layers are: {', '.join(available)}")
    if job.deepspeed is not None:
        path = Path(job.deepspeed)
        if not path.is_file():
            raise TrainSetupError(f"train.resources.deepspeed: DeepSpeed config file {str(path)!r} does not exist")
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TrainSetupError(f"train.resources.deepspeed: {path} is not valid JSON: {e}") from None
    r = cfg.train.resources
    have = ray.cluster_resources()
    cpus = r.num_workers * r.cpus_per_worker
    if cpus > have.get("CPU", 0):
        raise TrainSetupError(
            f"train.resources: {r.num_workers} workers x {r.cpus_per_worker} CPUs = {cpus:g} CPUs, but the Ray "
            f"cluster has {have.get('CPU', 0):g}: lower train.resources.num_workers or cpus_per_worker")
    if job.use_gpu and r.num_workers * r.gpus_per_worker > have.get("GPU", 0):
        raise TrainSetupError(
            f"train.resources: {r.num_workers} workers x {r.gpus_per_worker} GPUs, but the Ray cluster has "
            f"{have.get('GPU', 0):g} GPUs: lower num_workers or set use_gpu: false")


def _use_gpu(setting) -> bool:
    import ray

    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(setting)


# ---------------------------------------------------------------------------- the driver side


def plan_stage(cfg, stage: str, settings, model: str, head: str, upstream: list[Path] = (),
               extra: dict | None = None, extra_inputs: list[Path] = ()) -> tuple[StageJob, str, dict, list]:
    """The job, its manifest key, the config it hashes and the input fingerprints."""
    from hetray.orchestrate.ray_init import init_ray

    data = pairs_dir(cfg)
    for up in upstream:
        if mf.read_manifest(up) is None or not (up / STAGE_MODEL_DIR).is_dir():
            raise TrainSetupError(f"{up} has no trained model: run `hetray train {up.name}` first")
    init_ray(cfg.ray)
    r = cfg.train.resources
    run_dir = Path(cfg.run_dir).resolve()
    job = StageJob(
        stage=stage, settings=settings, model=model, head=head, data_dir=str(data),
        work_dir=str(run_dir / f".{stage}-work"), seed=settings.seed if settings.seed is not None else cfg.seed,
        use_gpu=_use_gpu(r.use_gpu), deepspeed=str(Path(r.deepspeed).resolve()) if r.deepspeed else None,
        extra=extra or {},
    )
    config = {
        "model": cfg.train.model, "settings": settings.model_dump(mode="json"), "seed": job.seed,
        "num_workers": r.num_workers, "deepspeed": r.deepspeed, "use_gpu": job.use_gpu,
    }
    inputs = [mf.fingerprint_dir(data)] + [mf.fingerprint_dir(p) for p in (*upstream, *extra_inputs)]
    key = mf.stage_key(f"train-{stage}", config, inputs)
    return job, key, config, inputs


def run_stage(cfg, job: StageJob, key: str, config: dict, inputs: list, build_trainer: Callable,
              force: bool = False, **worker_fns: Callable) -> dict:
    """Validate, skip when up to date, train on Ray Train, write the outputs. Returns the manifest.

    ``build_trainer(job)`` runs in each worker and returns the TRL trainer. ``worker_fns`` may
    replace the worker's other steps: ``train(trainer, checkpoint_dir or None)``,
    ``finish(trainer, job) -> dict`` (final metrics), ``save(trainer, adapter_dir)``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = time.time()
    run_dir = Path(cfg.run_dir).resolve()
    out_dir = run_dir / job.stage
    if not force and mf.is_up_to_date(out_dir, key):
        log.info("train %s: %s is up to date (key %s), skipping", job.stage, out_dir, key)
        return mf.read_manifest(out_dir)
    validate(cfg, job)
    # Ray Train's print patch tees prints into its logger, so the stdout that `datasets`
    # (through dill) captures to hash a function leaks whole disassemblies into the log.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    r = cfg.train.resources
    storage = run_dir / "ray_results"
    name = f"{job.stage}-{key}"  # the same config resumes a crashed run's checkpoints
    if force:
        shutil.rmtree(storage / name, ignore_errors=True)
    if not (storage / name).exists():  # a fresh run: no stale checkpoints or outputs
        shutil.rmtree(job.work_dir, ignore_errors=True)
    resources = {"CPU": r.cpus_per_worker} | ({"GPU": r.gpus_per_worker} if job.use_gpu else {})
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"job": job, "build": build_trainer, **worker_fns},
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=job.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=str(storage),
            failure_config=FailureConfig(max_failures=r.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    log.info("train %s: %d worker(s), %s, from %s", job.stage, r.num_workers, "GPU" if job.use_gpu else "CPU", job.model)
    trainer.fit()
    return _commit(job, key, config, inputs, started, out_dir, storage / name)


def _commit(job: StageJob, key, config, inputs, started, out_dir: Path, ray_run: Path) -> dict:
    """The work folder's out/ -> <run_dir>/<stage>/, with loss.png and the manifest."""
    out = job.out_dir
    metrics = json.loads((out / "metrics.json").read_text())
    plot_history(metrics["history"], out / "loss.png", job.stage)
    manifest = mf.new_manifest(f"train-{job.stage}", key, config, inputs, started)
    manifest.update({
        "model_in": job.model,
        "rows": metrics.get("rows"),
        "global_step": metrics["global_step"],
        "resumed_from_step": metrics.get("resumed_from_step"),
        "final": metrics.get("final", {}),
        "outputs": {"adapter": "adapter", "merged": STAGE_MODEL_DIR, "metrics": "metrics.json", "plot": "loss.png"},
    })
    mf.write_manifest(out, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(out, out_dir)
    shutil.rmtree(job.work_dir, ignore_errors=True)
    shutil.rmtree(ray_run, ignore_errors=True)
    log.info("train %s: %d steps -> %s", job.stage, manifest["global_step"], out_dir)
    return manifest


def plot_history(history: list[dict], path: Path, stage: str) -> None:
    """One panel per curve that was logged: loss, learning rate, and the stage's own metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = ["loss", "learning_rate", "accuracy", "rewards/accuracies", "objective/scores",
              "objective/kl", "reward", "kl", "loss/policy_avg", "eval_accuracy"]
    curves = {k: [(h["step"], h[k]) for h in history if k in h and "step" in h] for k in wanted}
    curves = {k: v for k, v in curves.items() if v}
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(4 * max(1, len(curves)), 3), squeeze=False)
    for ax, (k, pts) in zip(axes[0], curves.items()):
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".")
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.suptitle(f"train {stage}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------- the worker side


def training_args(job: StageJob) -> dict:
    """TrainingArguments keywords every TRL config takes, from the stage's settings."""
    import torch

    s = job.settings
    precision = s.precision
    if precision == "auto":
        precision = "bf16" if job.use_gpu and torch.cuda.is_bf16_supported() else "fp32"
    return dict(
        output_dir=str(Path(job.work_dir) / "hf"),
        max_steps=s.max_steps,
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
        save_total_limit=2,
        seed=job.seed,
        data_seed=job.seed,
        report_to="none",
        use_cpu=not job.use_gpu,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=s.gradient_checkpointing,
        deepspeed=job.deepspeed,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        disable_tqdm=True,  # one log line per logging step instead of a bar per worker
    )


class RayReport:
    """HF TrainerCallback: every log -> ``ray.train.report``; every save -> a Ray Checkpoint.

    ``ray.train.report`` is a barrier, so every rank calls it as often (HF calls on_log and
    on_save on every rank). Rank 0 reports the whole HF checkpoint folder; the other ranks
    report only their own files (RNG state, DeepSpeed shards), which Ray merges into it.
    """

    def __new__(cls):
        from transformers import TrainerCallback

        class _RayReport(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                import ray.train

                ray.train.report({**_scalars(logs or {}), "step": state.global_step})

            def on_save(self, args, state, control, **kwargs):
                import ray.train

                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                rank = ray.train.get_context().get_world_rank()
                with _own_files(ckpt, rank) as folder:
                    checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
                    ray.train.report({"step": state.global_step, "checkpoint_step": state.global_step},
                                     checkpoint=checkpoint)

        return _RayReport()


def _scalars(logs: dict) -> dict:
    return {k: v for k, v in logs.items() if isinstance(v, (int, float))}


class _own_files:
    """Rank 0: the checkpoint folder itself. Rank r: a temp copy of the files whose names
    carry the rank (``rng_state_1.pth``, ``..._rank_1_...``); None when there are none."""

    def __init__(self, ckpt: Path, rank: int):
        self.ckpt, self.rank, self.tmp = ckpt, rank, None

    def __enter__(self):
        import re
        import tempfile

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


def _train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker: build the TRL trainer, train (or resume), save."""
    import ray.train

    job: StageJob = config["job"]
    if not job.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU (before it is imported)
    rank = ray.train.get_context().get_world_rank()
    _note_pid(job, rank)
    if job.deepspeed:  # let DeepSpeed adopt Ray's process group (ZeRO-3 builds the model sharded)
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if job.use_gpu else "gloo")
    trainer = config["build"](job)
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
    final = config["finish"](trainer, job) if "finish" in config else {}
    config.get("save", hf_save)(trainer, str(job.out_dir / "adapter"))
    if rank == 0:
        _write_outputs(trainer, job, resumed_from, final)


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


def _write_outputs(trainer, job: StageJob, resumed_from, final: dict) -> None:
    """Rank 0: the merged checkpoint and the metrics history."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # else ZeRO-3 would shard the merge's model loads over ranks that are done
    out = job.out_dir
    merge_adapter(job.model, out / "adapter", out / STAGE_MODEL_DIR, job.head, trainer.processing_class)
    metrics = {
        "stage": job.stage,
        "global_step": trainer.state.global_step,
        "resumed_from_step": resumed_from,
        "rows": len(trainer.train_dataset) if trainer.train_dataset is not None else None,
        "final": final,
        "history": [dict(h) for h in trainer.state.log_history],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
