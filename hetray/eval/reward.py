"""Reward-model pairwise accuracy: how often r(prompt + chosen) > r(prompt + rejected).

The pairs are, by default, the reward stage's own held-out split: the stage's manifest names
the pairs folder it trained on (``data``, relative to the run folder), its ``eval_fraction``
and its seed, and ``hetray.pairs.split_pairs`` re-derives the very same split (every pair of a
held-out prompt), so the number is comparable to the stage's ``metrics.json``
``final.eval_accuracy``. ``EvalConfig.reward.pairs`` (a Parquet folder of
``prompt/chosen/rejected``) replaces them.

Texts are built as TRL's RewardTrainer builds them (chat template over prompt + answer when the
tokenizer has one; else prompt + " " + answer + EOS), scored in right-padded batches.
``load_items`` -> ``score_items`` -> ``aggregate``, as every suite (``SUITE``).
"""

from __future__ import annotations

from pathlib import Path

from hetray.eval.suite import Suite
from hetray.models import SEQ_CLS, load_model, load_tokenizer
from hetray.pairs import pair_rows, split_pairs, text_format
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


def text_of(reward_model: str):
    """How the reward model read its texts: its stage's ``train.text_format`` (manifest
    ``config.text``) as its tokenizer allows; chat when no stage manifest says otherwise."""
    stage = stage_dir_of(reward_model)
    text = ((read_manifest(stage) or {}).get("config") or {}).get("text") or {} if stage is not None else {}
    return text_format(load_tokenizer(model_dir_of(reward_model)), text.get("format", "chat"),
                       text.get("raw_template", "{prompt}"))


def load_items(reward_model: str, settings) -> list[dict]:
    """Pairs in TRL's format (chat turns or strings): ``settings.pairs`` or the held-out split,
    formatted as the reward model was trained (``text_of``)."""
    chat = text_of(reward_model)
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
    return pairs[: settings.limit] if settings.limit else pairs


class RewardModel:
    """A one-label sequence classifier and its tokenizer; ``rewards(token id lists)``."""

    def __init__(self, model, tokenizer, batch_size: int = 16, device: str = "cpu"):
        self.model, self.tokenizer, self.batch_size, self.device = model.eval().to(device), tokenizer, batch_size, device

    @classmethod
    def load(cls, path: str, batch_size: int = 16, device: str = "auto") -> RewardModel:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        path = model_dir_of(path)
        try:
            model = load_model(path, SEQ_CLS)
            tokenizer = load_tokenizer(path)
        except OSError as e:
            raise RewardEvalError(f"reward model {path!r} could not be loaded: {e}") from e
        return cls(model, tokenizer, batch_size, device)

    def token_ids(self, prompt, answer) -> list[int]:
        """As TRL's RewardTrainer tokenizes a (prompt, answer)."""
        tok = self.tokenizer
        if isinstance(prompt, list):
            return list(tok.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"])
        text = prompt + answer
        if not text.endswith(tok.eos_token):
            text += tok.eos_token
        return tok(text)["input_ids"]

    def rewards(self, ids: list[list[int]]) -> list[float]:
        import torch

        out = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(ids), self.batch_size):
            batch = ids[start: start + self.batch_size]
            width = max(len(x) for x in batch)
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch], device=self.device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch], device=self.device)
            with torch.no_grad():
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
            out += logits[:, 0].float().tolist()
        return out


def _text(x) -> str:
    return x[-1]["content"] if isinstance(x, list) else x.strip()


def score_items(rm: RewardModel, pairs: list[dict]) -> list[dict]:
    ids = []
    for p in pairs:
        ids += [rm.token_ids(p["prompt"], p["chosen"]), rm.token_ids(p["prompt"], p["rejected"])]
    r = rm.rewards(ids)
    return [
        {"prompt": _text(p["prompt"]), "chosen": _text(p["chosen"]), "rejected": _text(p["rejected"]),
         "reward_chosen": r[2 * i], "reward_rejected": r[2 * i + 1], "margin": r[2 * i] - r[2 * i + 1],
         "correct": r[2 * i] > r[2 * i + 1]}  # strictly, as TRL counts it
        for i, p in enumerate(pairs)
    ]


def aggregate(records: list[dict]) -> dict:
    n = len(records)
    if not n:
        return {"accuracy": float("nan"), "pairs": 0, "margin": float("nan")}
    return {"accuracy": sum(r["correct"] for r in records) / n, "pairs": n,
            "margin": sum(r["margin"] for r in records) / n}


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
