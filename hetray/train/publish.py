"""What a trained stage leaves for others: adapters that load elsewhere, model cards, hub uploads.

After Ray Train is done, in the driver (``driver.train_stage``):

* ``finish_models``: the adapter's ``base_model_name_or_path`` becomes portable
  (``hetray.models.portable_base``: the bundled model's hub id, a hub id, a path relative to the
  adapter for a model inside the run, else absolute), and ``adapter/`` and ``merged/`` each get
  a model card (``hetray.cards``; the reward stage's held-out accuracy in its ``model-index``).
* ``push_stage``: ``train.<stage>.push_to_hub`` uploads the adapter or the merged model
  (``push_folder``; auto: the adapter when its base is a hub model) once the stage is committed,
  once per trained stage; the manifest records the repo and commit (``pushed``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hetray.models import DEFAULT_LLM, portable_base
from hetray.stage import locked, write_manifest
from hetray.train.driver import STAGE_MODEL_DIR, UNKEYED, StageJob, resolve_base

log = logging.getLogger(__name__)


def finish_models(cfg, job: StageJob, out: Path, metrics: dict) -> None:
    """The adapter's base named so that it loads elsewhere, and a model card in ``adapter/``
    and ``merged/``."""
    from hetray.cards import write_model_card

    run_dir = Path(cfg.run_dir).resolve()
    adapter_config = out / "adapter" / "adapter_config.json"
    config = json.loads(adapter_config.read_text())
    # relative to where the adapter will lie once committed, not to this temporary folder
    config["base_model_name_or_path"] = portable_base(job.model, run_dir / job.stage / "adapter", run_dir)
    adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    root = portable_base(resolve_base(cfg.train.model), run_dir / job.stage / "adapter")  # the model it all began as
    settings = {k: v for k, v in job.settings.model_dump(mode="json", exclude=UNKEYED).items() if v is not None}
    settings["seed"] = job.seed
    final = metrics.get("final") or {}
    scores = {"held-out pairs": {k[len("eval_"):]: v for k, v in final.items() if k.startswith("eval_")}} if final else None
    notes = (f"Trained for {metrics['global_step']} steps on {metrics.get('rows')} rows of `{Path(job.data_dir).name}/`."
             + (f" hetray's bundled copy of `{root}` (its Q4_1 GGUF, dequantised) was the base."
                if cfg.train.model == DEFAULT_LLM else ""))
    for name, base, onto in (("adapter", root, config["base_model_name_or_path"]), (STAGE_MODEL_DIR, root, None)):
        repo = job.settings.push_to_hub if push_what(job.settings, config["base_model_name_or_path"]) == name else None
        write_model_card(out / name, base_model=base, stage=job.stage, datasets=hub_datasets(cfg),
                         hyperparameters=settings, metrics=scores, loads_onto=onto if onto != base else None,
                         location=repo or str(run_dir / job.stage / name), run_name=job.run_name, notes=notes)


def hub_datasets(cfg) -> list[str]:
    """The hub dataset ids among the converted sources (``hf://datasets/ORG/NAME/...`` paths)."""
    ids = []
    for source in cfg.convert.sources:
        for path in source.path if isinstance(source.path, list) else [source.path]:
            if str(path).startswith("hf://datasets/"):
                parts = str(path)[len("hf://datasets/"):].split("/")
                if len(parts) >= 2:
                    ids.append("/".join(parts[:2]).split("@")[0])
    return list(dict.fromkeys(ids))


def push_what(settings, adapter_base: str) -> str:
    """``push_folder``; auto: the adapter when its base is a hub model, else the merged model."""
    if settings.push_folder != "auto":
        return settings.push_folder
    return "adapter" if not adapter_base.startswith((".", "/")) else STAGE_MODEL_DIR


def push_stage(stage_dir: Path, manifest: dict, settings) -> dict:
    """Upload the stage's adapter or merged model to ``push_to_hub`` once per trained stage
    (a skipped stage already pushed there is not pushed again); the manifest records it."""
    from hetray.cards import push_folder

    repo = settings.push_to_hub
    pushed = manifest.get("pushed") or {}
    if pushed.get("repo") == repo and pushed.get("key") == manifest["key"]:
        return manifest
    base = json.loads((stage_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    what = push_what(settings, base)
    log.info("train %s: uploading %s/ to the hub repo %s", stage_dir.name, what, repo)
    info = push_folder(stage_dir / what, repo, commit_message=f"hetray {stage_dir.name} ({what}), key {manifest['key']}")
    with locked(stage_dir.parent):
        manifest = {**manifest, "pushed": {**info, "folder": what, "key": manifest["key"]}}
        write_manifest(stage_dir, manifest)
    return manifest
