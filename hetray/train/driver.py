"""The driver side of every training stage: plan, check, run Ray Train, commit.

A stage module (``sft.py``, ``reward.py``, ...) calls ``train_stage`` with its settings, the
model it starts from and a ``build_trainer(job)`` that runs in each worker. ``train_stage``:

1. plans the job (``StageJob``) and its stage for the runner (``hetray.stage``): the key
   hashes the settings, the pairs and the upstream stages, so an unchanged stage is skipped;
2. checks what can fail before Ray Train starts (``validate``): LoRA target modules, the
   DeepSpeed file, and that the Ray cluster has the CPUs / GPUs asked for;
3. runs a ``TorchTrainer`` (gloo on CPU, NCCL on GPU) whose workers run
   ``hetray.train.worker.train_loop`` and write ``adapter/``, ``merged/``, ``tensorboard/``
   and ``metrics.json`` into the runner's temporary folder, while the driver prints one line
   per logging step (``hetray.train.progress``);
4. finishes the folder: ``loss.png``, the last ``keep_checkpoints`` checkpoints (Ray's
   persisted copies) in ``checkpoints/``, the adapter's base named so that it loads elsewhere
   and a model card in ``adapter/`` and ``merged/`` (``hetray.train.publish``); the runner
   commits it as ``<run_dir>/<stage>/`` with the manifest;
5. uploads the adapter or merged model to ``push_to_hub``, when set (once per trained stage;
   ``hetray.train.publish``).

What does not change the trained model (trackers, checkpoints kept, the hub repo) is not in
the stage's key: changing it does not re-train.

Workers read the data and write the outputs under ``run_dir`` directly, so on a multi-node
cluster ``run_dir`` must be on storage that every node sees (as Ray's ``storage_path`` must).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hetray.models import check_model, linear_module_names, resolve_llm
from hetray.schema import parquet_files
from hetray.stage import Stage, read_manifest, require_ray, run_stage
from hetray.tracking import active, tracker_env

log = logging.getLogger(__name__)

STAGE_MODEL_DIR = "merged"  # what the next stage (and the evaluation) loads from a stage folder
TENSORBOARD_DIR = "tensorboard"  # TensorBoard events in a stage folder
CHECKPOINTS_DIR = "checkpoints"  # the last keep_checkpoints checkpoints in a stage folder
UNKEYED = {"report_to", "keep_checkpoints", "push_to_hub", "push_folder"}  # settings that leave the model as is


class TrainSetupError(ValueError):
    """A training setting that cannot work; raised before Ray Train starts."""


@dataclass
class StageJob:
    """Everything a worker needs, pickled to each Ray Train worker."""

    stage: str
    settings: Any  # the stage's *Settings (pydantic)
    model: str  # checkpoint the stage starts from (folder or hub id)
    head: str  # hetray.models.CAUSAL or SEQ_CLS
    data_dir: str  # pairs (selected/ or preferences/)
    work_dir: str  # <run_dir>/.<stage>-work: hf/ checkpoints, pids/
    out_dir: str  # where rank 0 writes adapter/, merged/, metrics.json
    seed: int
    use_gpu: bool
    deepspeed: str | None
    extra: dict = field(default_factory=dict)  # stage-specific: sft_only dir, reward model, ...
    text_format: str = "chat"  # train.text_format: chat | raw (hetray.pairs.text_format)
    raw_template: str = "{prompt}"  # train.raw_template
    report_to: list = field(default_factory=list)  # transformers' trackers (empty: none)
    run_name: str | None = None  # <job>/<run folder>/<stage>, for the trackers
    tracker_env: dict = field(default_factory=dict, repr=False)  # the driver's MLFLOW_* / WANDB_* variables


def report_to(cfg, settings) -> list[str]:
    """The stage's trackers: its own ``report_to`` or ``train.report_to``; ``none`` -> []."""
    return active(settings.report_to if settings.report_to is not None else cfg.train.report_to)


def run_name(cfg, stage: str) -> str:
    """``<job>/<run folder>/<stage>``: the trackers' run name."""
    return f"{cfg.name}/{Path(cfg.run_dir).name}/{stage}"


def pairs_dir(cfg) -> str:
    """The pairs to train on, by name in the run dir: ``train.data`` (selected/), or
    preferences/ when it is absent."""
    run_dir = Path(cfg.run_dir)
    for name in dict.fromkeys([cfg.train.data, "preferences"]):
        if parquet_files(run_dir / name):
            return name
    raise TrainSetupError(
        f"no pairs to train on in {run_dir}/{cfg.train.data} or {run_dir}/preferences: "
        "run `hetray convert` (and `hetray select`) first")


def resolve_base(name: str) -> str:
    """The base LLM as a local folder or hub id; an unknown name fails with the model named."""
    check_model(name)  # raises ModelNotFoundError (a ValueError) naming the model
    return resolve_llm(name)


def start_model(cfg, init: str) -> tuple[str, tuple[str, ...]]:
    """(model, upstream stages) for a stage that starts from the SFT model (``init: sft``) or
    the base LLM (``init: base``)."""
    if init == "sft":
        return str(Path(cfg.run_dir).resolve() / "sft" / STAGE_MODEL_DIR), ("sft",)
    return resolve_base(cfg.train.model), ()


def validate(cfg, job: StageJob) -> None:
    """Fail before Ray Train starts: LoRA targets, DeepSpeed file, cluster size."""
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


def training_stage(cfg, stage: str, settings, upstream: tuple[str, ...] = (),
                   extra_inputs: tuple[str, ...] = ()) -> Stage:
    """The stage as the runner sees it: its key covers the settings, the pairs, the upstream
    stages and the extra input folders (names in the run dir)."""
    require_ray(f"train {stage}")
    run_dir = Path(cfg.run_dir).resolve()
    data = pairs_dir(cfg)
    for up in upstream:
        if read_manifest(run_dir / up) is None or not (run_dir / up / STAGE_MODEL_DIR).is_dir():
            raise TrainSetupError(f"{run_dir / up} has no trained model: run `hetray train {up}` first")
    r = cfg.train.resources
    config = {"model": cfg.train.model, "settings": settings.model_dump(mode="json", exclude=UNKEYED),
              "text": {"format": cfg.train.text_format, "raw_template": cfg.train.raw_template},
              "seed": settings.seed if settings.seed is not None else cfg.seed, "data": data,
              "num_workers": r.num_workers, "deepspeed": r.deepspeed, "use_gpu": _use_gpu(r.use_gpu)}
    return Stage(f"train-{stage}", run_dir, outputs=(stage,), config=config,
                 inputs=[run_dir / data, *(run_dir / u for u in upstream), *(run_dir / i for i in extra_inputs)])


def train_stage(cfg, stage: str, settings, model: str, head: str, build_trainer: Callable,
                upstream: tuple[str, ...] = (), extra: dict | None = None, extra_inputs: tuple[str, ...] = (),
                force: bool = False, **worker_fns: Callable) -> dict:
    """Train one stage on Ray Train (or skip it when up to date). Returns its manifest.

    ``upstream``: stage folders (names in the run dir) whose trained model this stage needs.
    ``build_trainer(job)`` runs in each worker and returns the TRL trainer; ``worker_fns`` may
    replace the worker's other steps: ``train(trainer, checkpoint_dir or None)``,
    ``finish(trainer, job, merged_dir) -> dict`` (final metrics; rank 0, after the merge),
    ``save(trainer, adapter_dir)``.
    """
    spec = training_stage(cfg, stage, settings, upstream, extra_inputs)
    run_dir, data = spec.root, spec.config["data"]
    r = cfg.train.resources

    def work(tmp: Path) -> dict:
        job = StageJob(
            stage=stage, settings=settings, model=model, head=head, data_dir=str((run_dir / data).resolve()),
            work_dir=str(run_dir / f".{stage}-work"), out_dir=str(tmp / stage), seed=spec.config["seed"],
            use_gpu=spec.config["use_gpu"],
            deepspeed=str(Path(r.deepspeed).resolve()) if r.deepspeed else None, extra=extra or {},
            text_format=cfg.train.text_format, raw_template=cfg.train.raw_template,
            report_to=report_to(cfg, settings), run_name=run_name(cfg, stage), tracker_env=tracker_env())
        validate(cfg, job)
        result, ray_run = _fit(cfg, job, spec.key(), build_trainer, force, worker_fns)
        out = tmp / stage
        metrics = json.loads((out / "metrics.json").read_text())
        from hetray.train.worker import plot_history

        plot_history(metrics["history"], out / "loss.png", stage)
        kept = keep_checkpoints(result, out / CHECKPOINTS_DIR, settings.keep_checkpoints)
        from hetray.train.publish import finish_models

        finish_models(cfg, job, out, metrics)
        shutil.rmtree(job.work_dir, ignore_errors=True)
        shutil.rmtree(ray_run, ignore_errors=True)
        log.debug("train %s: %d steps", stage, metrics["global_step"])
        budget = metrics.get("budget") or {}
        outputs = {"adapter": "adapter", "merged": STAGE_MODEL_DIR, "metrics": "metrics.json", "plot": "loss.png"}
        if (out / TENSORBOARD_DIR).is_dir():
            outputs["tensorboard"] = TENSORBOARD_DIR
        if kept:
            outputs["checkpoints"] = CHECKPOINTS_DIR
        return {"model_in": model, "data": data, "rows": metrics.get("rows"), "global_step": metrics["global_step"],
                "max_steps": budget.get("max_steps"), "epochs_seen": budget.get("epochs_seen"), "budget": budget,
                "resumed_from_step": metrics.get("resumed_from_step"), "final": metrics.get("final", {}),
                "trl_config": metrics.get("trl_config"), "checkpoints": kept,
                "tracking": {"report_to": job.report_to, "run_name": job.run_name}, "outputs": outputs}

    manifest = run_stage(spec, work, force=force)
    if settings.push_to_hub:
        from hetray.train.publish import push_stage

        manifest = push_stage(run_dir / stage, manifest, settings)
    return manifest


def keep_checkpoints(result, folder: Path, keep: int) -> list[str]:
    """The last ``keep`` checkpoints Ray persisted (whole: every rank's files), moved to
    ``folder/checkpoint-<step>``; HF checkpoints that ``resume_from_checkpoint`` takes."""
    saved = sorted(((m["checkpoint_step"], c) for c, m in (result.best_checkpoints or []) if m.get("checkpoint_step")),
                   key=lambda s: s[0])
    kept = []
    for step, checkpoint in saved[max(0, len(saved) - keep):] if keep else []:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(checkpoint.path, folder / f"checkpoint-{step}")
        kept.append(f"{CHECKPOINTS_DIR}/checkpoint-{step}")
    return kept


def _fit(cfg, job: StageJob, key: str, build_trainer: Callable, force: bool, worker_fns: dict):
    """The Ray Train run, one console line per log; returns its result and its storage folder
    (checkpoints), for the caller to keep the last ones and remove the rest."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from hetray.train.progress import Console
    from hetray.train.worker import train_loop

    # Ray Train's print patch tees prints into its logger, so the stdout that `datasets`
    # (through dill) captures to hash a function leaks whole disassemblies into the log.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    r = cfg.train.resources
    storage = Path(cfg.run_dir).resolve() / "ray_results"
    name = f"{job.stage}-{key}"  # the same config resumes a crashed run's checkpoints
    if force:
        shutil.rmtree(storage / name, ignore_errors=True)
    if not (storage / name).exists():  # a fresh run: no stale checkpoints
        shutil.rmtree(job.work_dir, ignore_errors=True)
    resources = {"CPU": r.cpus_per_worker} | ({"GPU": r.gpus_per_worker} if job.use_gpu else {})
    log.info("train %s: %d worker(s), %s, from %s", job.stage, r.num_workers, "GPU" if job.use_gpu else "CPU", job.model)
    with Console(job.stage) as console:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"job": job, "build": build_trainer, **worker_fns},
            torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=job.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=name, storage_path=str(storage), callbacks=[console.relay],
                failure_config=FailureConfig(max_failures=r.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=max(1, job.settings.keep_checkpoints)),
            ),
        )
        result = trainer.fit()
    return result, storage / name
