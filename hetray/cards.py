"""Model cards (``README.md``) for every model a training stage writes, and hub uploads.

A card is the hub's own format, written with ``huggingface_hub``'s ``ModelCard``: YAML metadata
(``base_model``, ``library_name`` peft for an adapter or transformers for a merged model,
``datasets``, ``tags: [hetray, trl, <stage>, lora]``, ``pipeline_tag``, ``model-index`` for
metrics, and ``hetray:`` with the stage and run) over a short body: what the stage did, its
hyperparameters, how to load the model, and its metrics. ``update_model_card_metrics`` adds
metrics later (after ``hetray eval``); ``push_folder`` uploads a folder with ``HfApi``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

CARD = "README.md"
STAGE_TEXT = {
    "sft": "supervised fine-tuning (LoRA) on prompt + chosen answer",
    "reward": "a reward model: a one-label sequence classifier trained on (prompt, chosen, rejected) pairs",
    "ppo": "RLHF with PPO against the run's reward model",
    "rloo": "RLHF with RLOO (REINFORCE leave-one-out) against the run's reward model",
    "dpo": "direct preference optimisation on (prompt, chosen, rejected) pairs",
}
TRAINERS = {"sft": "SFTTrainer", "reward": "RewardTrainer", "ppo": "PPOTrainer", "rloo": "RLOOTrainer",
            "dpo": "DPOTrainer"}
_METRICS = re.compile(r"<!-- hetray:metrics -->.*?<!-- /hetray:metrics -->", re.S)


def write_model_card(folder, *, base_model: str | None, stage: str, datasets=(), hyperparameters: dict | None = None,
                     metrics: dict | None = None, loads_onto: str | None = None, location: str | None = None,
                     run_name: str | None = None, notes: str = "") -> Path:
    """Write ``<folder>/README.md`` for the adapter or merged model in ``folder``.

    ``base_model``: the hub id (or path) the model derives from; ``loads_onto``: what an
    adapter loads onto when that is not ``base_model`` (e.g. the run's SFT model);
    ``datasets``: hub dataset ids; ``metrics``: ``{dataset: {metric: value}}`` or
    ``{"dataset/metric": value}``; ``location``: the folder or hub repo the snippet loads."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    adapter = (folder / "adapter_config.json").is_file()
    reward = stage == "reward"
    results = _eval_results(metrics, "text-classification" if reward else "text-generation")
    data = ModelCardData(
        base_model=base_model, library_name="peft" if adapter else "transformers", datasets=list(datasets) or None,
        tags=["hetray", "trl", stage, "lora"], pipeline_tag="text-classification" if reward else "text-generation",
        eval_results=results or None, model_name=(run_name or f"hetray-{stage}") if results else None,
        hetray={"stage": stage, "run": run_name, "kind": "adapter" if adapter else "merged"},
    )
    kind = "LoRA adapter" if adapter else "merged model (base + LoRA)"
    lines = [f"# {run_name or 'hetray'}: {stage} {kind}", "",
             f"Stage **{stage}** of a hetray run: {STAGE_TEXT.get(stage, stage)}, trained with "
             f"TRL's `{TRAINERS.get(stage, 'Trainer')}` on Ray Train.", ""]
    if base_model:
        lines += [f"Base model: `{base_model}`." + (f" The adapter loads onto `{loads_onto}`." if loads_onto else ""), ""]
    if notes:
        lines += [notes, ""]
    if hyperparameters:
        lines += ["## Hyperparameters", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in _flat(hyperparameters).items()] + [""]
    snippet = _snippet(location or str(folder), adapter, reward, loads_onto)
    lines += ["## How to load", "", "```python", *snippet, "```", ""]
    lines += ["## Metrics", "", _metrics_block(_flat_metrics(metrics)), ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    card.save(folder / CARD)
    return folder / CARD


def update_model_card_metrics(folder, metrics: dict) -> Path:
    """Merge ``metrics`` (as ``write_model_card`` takes them) into the card's ``model-index`` and
    its Metrics table; a metric given again replaces the old value."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD
    card = ModelCard.load(path)
    task = card.data.pipeline_tag or "text-generation"
    results = list(card.data.eval_results or [])
    for n in _eval_results(metrics, task):  # in place when known, so the table keeps its order
        i = next((i for i, r in enumerate(results) if r.is_equal_except_value(n)), None)
        if i is None:
            results.append(n)
        else:
            results[i] = n
    card.data.eval_results = results or None
    if card.data.eval_results and not card.data.model_name:
        card.data.model_name = (card.data.get("hetray") or {}).get("run") or Path(folder).name
    table = {f"{r.dataset_name}/{r.metric_type}": r.metric_value for r in card.data.eval_results or []}
    block = _metrics_block(table)
    card.text = _METRICS.sub(lambda _: block, card.text) if _METRICS.search(card.text) else \
        card.text.rstrip() + "\n\n## Metrics\n\n" + block + "\n"
    card.save(path)
    return path


def push_folder(folder, repo_id: str, *, commit_message: str, private: bool | None = None) -> dict:
    """Upload ``folder`` (card included) to the hub model repo ``repo_id``, creating it if needed."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                             commit_message=commit_message)
    return {"repo": repo_id, "commit": getattr(info, "oid", None), "url": getattr(info, "commit_url", None)}


# ---------------------------------------------------------------------------- helpers


def _flat_metrics(metrics: dict | None) -> dict:
    """``{"dataset/metric": number}``; anything not a finite number left out."""
    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            out[key if "/" in key else f"hetray/{key}"] = value
    return {k: v for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _eval_results(metrics: dict | None, task: str) -> list:
    from huggingface_hub import EvalResult

    results = []
    for key, value in _flat_metrics(metrics).items():
        dataset, metric = key.rsplit("/", 1)
        results.append(EvalResult(task_type=task, dataset_type=dataset, dataset_name=dataset, metric_type=metric,
                                  metric_value=value))
    return results


def _metrics_block(flat: dict) -> str:
    rows = [f"| {k} | {_cell(v)} |" for k, v in flat.items()]
    body = "\n".join(["| metric | value |", "|---|---|", *rows]) if rows else "None yet (`hetray eval` adds them)."
    return f"<!-- hetray:metrics -->\n{body}\n<!-- /hetray:metrics -->"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, dict):
            out[f"{prefix}{k}"] = v
    return out


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _snippet(location: str, adapter: bool, reward: bool, loads_onto: str | None = None) -> list[str]:
    auto = "AutoModelForSequenceClassification" if reward else "AutoModelForCausalLM"
    extra = ", num_labels=1" if reward else ""
    if adapter and loads_onto:  # a base that is not a hub model: load it, then the adapter onto it
        where = "  # relative to the adapter folder" if not Path(loads_onto).is_absolute() else ""
        return ["from peft import PeftModel", f"from transformers import {auto}, AutoTokenizer", "",
                f"base = {auto}.from_pretrained({loads_onto!r}{extra}){where}",
                f"model = PeftModel.from_pretrained(base, {location!r})",
                f"tokenizer = AutoTokenizer.from_pretrained({location!r})"]
    if adapter:
        peft_auto = "AutoPeftModelForSequenceClassification" if reward else "AutoPeftModelForCausalLM"
        return [f"from peft import {peft_auto}", "from transformers import AutoTokenizer", "",
                "# the base model comes from adapter_config.json (base_model_name_or_path)",
                f"model = {peft_auto}.from_pretrained({location!r}{extra})",
                f"tokenizer = AutoTokenizer.from_pretrained({location!r})"]
    return [f"from transformers import {auto}, AutoTokenizer", "",
            f"model = {auto}.from_pretrained({location!r}{extra})",
            f"tokenizer = AutoTokenizer.from_pretrained({location!r})"]
