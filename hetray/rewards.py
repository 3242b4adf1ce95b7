"""A reward model's pairwise accuracy: how often r(prompt + chosen) > r(prompt + rejected).

The one code path for that number: the reward stage's held-out accuracy (``metrics.json``
``final.eval_accuracy``, what Ray Tune searches against) and ``hetray eval --suites reward``
both score their pairs here, on the merged checkpoint, with the same texts, the same
``max_length`` rule and the same count. It lives below training and evaluation, which both
import it (evaluation never imports training internals).

* Texts as TRL's RewardTrainer builds them: the chat template over prompt + answer when the
  pairs are chat turns, else prompt + answer + EOS (``token_ids``).
* Pairs whose chosen or rejected text is longer than ``max_length`` tokens are left out, as
  the RewardTrainer leaves them out of training (``fitting``); the count says how many.
* Scored in right-padded batches; a pair is right when the chosen reward is strictly higher
  (a tie is wrong, as TRL counts it).
"""

from __future__ import annotations

import math

from hetray.models import SEQ_CLS, load_model, load_tokenizer


class RewardModelError(ValueError):
    """A reward model that cannot be loaded; the message names it."""


def token_ids(tokenizer, prompt, answer) -> list[int]:
    """The token ids of (prompt, answer) as TRL's RewardTrainer tokenizes them."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"])
    text = prompt + answer
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return tokenizer(text)["input_ids"]


def fitting(pairs: list[dict], tokenizer, max_length: int | None) -> list[dict]:
    """The pairs whose chosen and rejected texts both fit in ``max_length`` tokens (all: None)."""
    if max_length is None:
        return list(pairs)
    return [p for p in pairs if max(len(token_ids(tokenizer, p["prompt"], p[k])) for k in ("chosen", "rejected"))
            <= max_length]


class RewardModel:
    """A one-label sequence classifier and its tokenizer; ``rewards(token id lists)``."""

    def __init__(self, model, tokenizer, batch_size: int = 16, device: str = "cpu"):
        self.model, self.tokenizer, self.batch_size, self.device = model.eval().to(device), tokenizer, batch_size, device

    @classmethod
    def load(cls, path: str, batch_size: int = 16, device: str = "auto") -> RewardModel:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            model = load_model(path, SEQ_CLS)
            tokenizer = load_tokenizer(path)
        except OSError as e:
            raise RewardModelError(f"reward model {path!r} could not be loaded: {e}") from e
        return cls(model, tokenizer, batch_size, device)

    def token_ids(self, prompt, answer) -> list[int]:
        return token_ids(self.tokenizer, prompt, answer)

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
    """One record per pair: both rewards, the margin, and whether the chosen answer won."""
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
    """Pairwise accuracy, the pair count and the mean margin."""
    n = len(records)
    if not n:
        return {"accuracy": float("nan"), "pairs": 0, "margin": float("nan")}
    return {"accuracy": sum(r["correct"] for r in records) / n, "pairs": n,
            "margin": sum(r["margin"] for r in records) / n}


def pairwise_loss(records: list[dict]) -> float:
    """The reward loss on the pairs, -log sigmoid(margin) averaged (TRL's, without a margin term)."""
    if not records:
        return float("nan")
    return sum(math.log1p(math.exp(-r["margin"])) if r["margin"] > -30 else -r["margin"] for r in records) / len(records)
