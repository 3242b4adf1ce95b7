"""Preference pairs as trainers and evaluators read them, and the held-out split.

Below both ``train/`` and ``eval/``: the reward stage holds out the pairs of a seeded share of
prompts, and the reward suite of the evaluation scores exactly those pairs, so both call
``split_pairs`` here with plain arguments (a folder, a fraction, a seed).

Rows follow TRL's formats: chat turns (``[{"role": "user", ...}]``) when the model has a chat
template, else plain strings with the answer after one space.
"""

from __future__ import annotations

import os

from hetray.schema import make_id, prompt_id, read_table


def _user(text: str, chat: bool):
    return [{"role": "user", "content": text}] if chat else text


def _assistant(text: str, chat: bool):
    return [{"role": "assistant", "content": text}] if chat else " " + text


def uses_chat(tokenizer, wanted: bool = True) -> bool:
    return wanted and bool(getattr(tokenizer, "chat_template", None))


def sft_rows(data_dir, sft_only_dir=None, chat: bool = True) -> list[dict]:
    """prompt + chosen of every pair (and prompt + response of sft_only/), as TRL's
    prompt-completion format."""
    pairs = read_table(data_dir, ["prompt", "chosen"]).to_pylist()
    rows = [(p["prompt"], p["chosen"]) for p in pairs]
    if sft_only_dir is not None:
        rows += [(r["prompt"], r["response"]) for r in read_table(sft_only_dir, ["prompt", "response"]).to_pylist()]
    return [{"prompt": _user(p, chat), "completion": _assistant(c, chat)} for p, c in rows]


def pair_rows(data_dir, chat: bool = True) -> list[dict]:
    """prompt / chosen / rejected of every pair, as TRL's preference format."""
    pairs = read_table(data_dir, ["prompt", "chosen", "rejected"]).to_pylist()
    return [{"prompt": _user(p["prompt"], chat), "chosen": _assistant(p["chosen"], chat),
             "rejected": _assistant(p["rejected"], chat)} for p in pairs]


def prompt_rows(data_dir, chat: bool = True) -> list[dict]:
    """Each distinct prompt once (for PPO / RLOO rollouts), in first-seen order."""
    prompts = dict.fromkeys(read_table(data_dir, ["prompt"])["prompt"].to_pylist())
    return [{"prompt": _user(p, chat)} for p in prompts]


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
