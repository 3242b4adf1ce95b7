"""Reward-model pairwise accuracy: how often r(prompt + chosen) > r(prompt + rejected).

The pairs are, by default, the reward stage's own held-out split: the stage's manifest names
the pairs folder it trained on (``data``, relative to the run folder), its ``eval_fraction``
and its seed, and ``hetray.pairs.split_pairs`` re-derives the very same split (every pair of a
held-out prompt), so the number is comparable to the stage's ``metrics.json``
``final.eval_accuracy``. ``EvalConfig.reward.pairs`` (a Parquet folder of
``prompt/chosen/rejected``) replaces them.

Scoring is ``hetray.rewards``: the very code the reward stage computes its held-out accuracy
with, on the same merged checkpoint, so the two numbers are the same. Texts are built as TRL's
RewardTrainer builds them (chat template over prompt + answer when the tokenizer has one; else
prompt + " " + answer + EOS), and pairs longer than the stage's ``max_length`` (manifest
``config.settings.max_length``) are left out, as the stage left them out; they are scored in
right-padded batches. ``load_items`` -> ``score_items`` -> ``aggregate``, as every suite
(``SUITE``).
"""

from __future__ import annotations

from pathlib import Path

from hetray import rewards
from hetray.eval.suite import Suite
from hetray.models import load_tokenizer
from hetray.pairs import pair_rows, split_pairs, text_format
from hetray.rewards import aggregate, score_items  # noqa: F401 (the suite's steps, named as every suite's)
from hetray.schema import read_table
from hetray.stage import read_manifest

STAGE = "train-reward"  # the reward stage's name in its manifest
MODEL_DIR = "merged"  # the checkpoint a training stage leaves in its folder for the next one


class RewardEvalError(ValueError):
    """A reward model or pair set that cannot be evaluated; the message names it."""


def stage_dir_of(reward_model: str) -> Path | None:
    """The reward stage folder (the one with ``manifest.json``) for a run dir, a stage dir or
    its ``merged/`` checkpoint; None for a model that no reward stage wrote."""
    p = Path(reward_model)
    for cand in (p, p.parent, p / "reward"):
        m = read_manifest(cand) if cand.is_dir() else None
        if m is not None and m.get("stage") == STAGE:
            return cand
    return None


def model_dir_of(reward_model: str) -> str:
    """The checkpoint to load: ``<stage>/merged`` for a run or stage folder, else as given."""
    stage = stage_dir_of(reward_model)
    if stage is not None and Path(reward_model).resolve() in (stage.resolve(), stage.parent.resolve()):
        return str(stage / MODEL_DIR)
    return reward_model


def held_out_pairs(stage: Path, chat) -> list[dict]:
    """The reward stage's held-out pairs, re-derived from its manifest with the stage's split."""
    m = read_manifest(stage)
    try:
        data_dir = stage.parent / m["data"]
        fraction, seed = m["config"]["settings"]["eval_fraction"], m["config"]["seed"]
    except (KeyError, TypeError) as e:
        raise RewardEvalError(f"{stage}/manifest.json: no {e} (the pairs folder, eval_fraction and seed "
                              "of the reward stage), so its held-out pairs are unknown") from None
    if not read_table(data_dir, ["prompt"]).num_rows:
        raise RewardEvalError(f"{stage}/manifest.json: the pairs it was trained on ({data_dir}) are gone")
    return split_pairs(data_dir, fraction, seed, chat)[1]


def _stage_settings(reward_model: str) -> tuple[dict, dict]:
    """(config.text, config.settings) of the reward model's stage manifest; empty without one."""
    stage = stage_dir_of(reward_model)
    config = ((read_manifest(stage) or {}).get("config") or {}) if stage is not None else {}
    return config.get("text") or {}, config.get("settings") or {}


def text_of(reward_model: str, tokenizer=None):
    """How the reward model read its texts: its stage's ``train.text_format`` (manifest
    ``config.text``) as its tokenizer allows; chat when no stage manifest says otherwise."""
    text, _ = _stage_settings(reward_model)
    return text_format(tokenizer or load_tokenizer(model_dir_of(reward_model)), text.get("format", "chat"),
                       text.get("raw_template", "{prompt}"))


def load_items(reward_model: str, settings) -> list[dict]:
    """Pairs in TRL's format (chat turns or strings): ``settings.pairs`` or the held-out split,
    formatted as the reward model was trained (``text_of``), without the ones longer than the
    stage's ``max_length`` (``hetray.rewards.fitting``, as the stage measured its accuracy)."""
    tokenizer = load_tokenizer(model_dir_of(reward_model))
    chat = text_of(reward_model, tokenizer)
    if settings.pairs:
        if not read_table(settings.pairs, ["prompt"]).num_rows:
            raise RewardEvalError(f"eval.reward.pairs: no Parquet pairs in {settings.pairs!r}")
        pairs = pair_rows(settings.pairs, chat)
    else:
        stage = stage_dir_of(reward_model)
        if stage is None:
            raise RewardEvalError(
                f"reward model {reward_model!r} has no reward-stage manifest beside it, so its held-out "
                "pairs are unknown: give a run's reward/ folder or eval.reward.pairs=<Parquet folder>")
        pairs = held_out_pairs(stage, chat)
        if not pairs:
            raise RewardEvalError(f"{stage}: the reward stage held out no pairs (train.reward.eval_fraction=0?)")
    pairs = rewards.fitting(pairs, tokenizer, _stage_settings(reward_model)[1].get("max_length"))
    return pairs[: settings.limit] if settings.limit else pairs


class RewardModel(rewards.RewardModel):
    """``hetray.rewards.RewardModel`` that also takes a run or reward-stage folder."""

    @classmethod
    def load(cls, path: str, batch_size: int = 16, device: str = "auto") -> RewardModel:
        try:
            return super().load(model_dir_of(path), batch_size, device)
        except rewards.RewardModelError as e:
            raise RewardEvalError(str(e)) from e


SUITE = Suite(
    name="reward", kind="reward", title="Reward model: pairwise accuracy on held-out pairs",
    columns=(("accuracy", "Pairwise accuracy", "higher"), ("margin", "Mean margin", None), ("pairs", "pairs", None),
             ("reward_model", "reward model", None)),
    load=lambda cfg, reward_model: load_items(reward_model, cfg.reward),
    score=lambda rm, pairs, cfg: score_items(rm, pairs),
    aggregate=aggregate,
    plot_metrics=(("accuracy", "reward accuracy"),),
    item_id=lambda r: "\x1f".join((r["prompt"], r["chosen"], r["rejected"])),  # reward models may differ in pairs
)
