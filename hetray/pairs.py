"""Preference pairs as trainers and evaluators read them, and the held-out split.

Below both ``train/`` and ``eval/``: the reward stage holds out the pairs of a seeded share of
prompts, and the reward suite of the evaluation scores exactly those pairs, so both call
``split_pairs`` here with plain arguments (a folder, a fraction, a seed).

Rows follow TRL's formats, as a ``TextFormat`` says (``text_format`` picks it from the
``train.text_format`` / ``train.raw_template`` settings and the tokenizer): chat turns
(``[{"role": "user", ...}]``) when the model has a chat template and chat is wanted, else raw
text: the prompt through the raw template, the answer after one space. Every training stage
builds its rows here, so SFT, the reward model and PPO / RLOO / DPO read the same text. The
row builders also take a bool, as before: True is chat (when the model has a template), False
raw text with the plain ``{prompt}`` template.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hetray.schema import make_id, prompt_id, read_table


@dataclass(frozen=True)
class TextFormat:
    """How a prompt and its answer become what the model reads."""

    chat: bool = True  # chat turns, for the tokenizer's chat template
    template: str = "{prompt}"  # raw text: the prompt ({prompt} replaced); the answer follows after one space


def _format(text) -> TextFormat:
    return text if isinstance(text, TextFormat) else TextFormat(chat=bool(text))


def _user(prompt: str, text):
    fmt = _format(text)
    return [{"role": "user", "content": prompt}] if fmt.chat else fmt.template.replace("{prompt}", prompt)


def _assistant(answer: str, text):
    return [{"role": "assistant", "content": answer}] if _format(text).chat else " " + answer


def uses_chat(tokenizer, wanted: bool = True) -> bool:
    return wanted and bool(getattr(tokenizer, "chat_template", None))


def text_format(tokenizer, wanted: str = "chat", raw_template: str = "{prompt}") -> TextFormat:
    """The format the settings ask for (``chat`` | ``raw``) as this tokenizer allows: chat needs
    a chat template, a model without one reads raw text."""
    return TextFormat(chat=uses_chat(tokenizer, wanted == "chat"), template=raw_template)


def sft_rows(data_dir, sft_only_dir=None, text: TextFormat | bool = True) -> list[dict]:
    """prompt + chosen of every pair (and prompt + response of sft_only/), as TRL's
    prompt-completion format."""
    pairs = read_table(data_dir, ["prompt", "chosen"]).to_pylist()
    rows = [(p["prompt"], p["chosen"]) for p in pairs]
    if sft_only_dir is not None:
        rows += [(r["prompt"], r["response"]) for r in read_table(sft_only_dir, ["prompt", "response"]).to_pylist()]
    return [{"prompt": _user(p, text), "completion": _assistant(c, text)} for p, c in rows]


def pair_rows(data_dir, text: TextFormat | bool = True) -> list[dict]:
    """prompt / chosen / rejected of every pair, as TRL's preference format."""
    pairs = read_table(data_dir, ["prompt", "chosen", "rejected"]).to_pylist()
    return [{"prompt": _user(p["prompt"], text), "chosen": _assistant(p["chosen"], text),
             "rejected": _assistant(p["rejected"], text)} for p in pairs]


def prompt_rows(data_dir, text: TextFormat | bool = True) -> list[dict]:
    """Each distinct prompt once (for PPO / RLOO rollouts), in first-seen order."""
    prompts = dict.fromkeys(read_table(data_dir, ["prompt"])["prompt"].to_pylist())
    return [{"prompt": _user(p, text)} for p in prompts]


def held_out(prompt: str, fraction: float, seed: int) -> bool:
    """Whether a prompt is held out: a seeded hash of its id, the same on every worker and run."""
    return int(make_id(prompt_id(prompt), str(seed)), 16) / 16**16 < fraction


def split_pairs(data_dir: str | os.PathLike, fraction: float, seed: int, chat: bool = True
                ) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pair rows: every pair of a held-out prompt is held out, so accuracy is
    measured on prompts never trained on."""
    prompts = read_table(data_dir, ["prompt"])["prompt"].to_pylist()
    rows = pair_rows(data_dir, chat)
    held = [held_out(p, fraction, seed) for p in prompts]
    return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]


def holdout(record_id: str, fraction: float) -> bool:
    """Whether a record (a WinoGrande ``qID``) is kept out of training for evaluation: an
    unseeded hash of its id, so every run of every job agrees on it and a job that trains on
    the rest of a file can evaluate on these rows without contamination."""
    return int(make_id("holdout", record_id), 16) / 16**16 < fraction
