"""Instruction following on plain chat prompts (paper 4.2, appendix A.5).

Each prompt of ``EvalConfig.chat.prompts`` is put through the model's chat template (when its
tokenizer has one) and answered greedily. The answers of every compared model are written side
by side (``chat.md``, ``chat.jsonl``) for a person to read, with four automatic signals per
answer, aggregated as rates:

* ``non_empty``: the answer has some non-blank text;
* ``repeats_prompt``: the answer only echoes the prompt (the prompt is in it, or it is a piece
  of the prompt), after lower-casing and dropping punctuation;
* ``stops``: generation ended by itself (an EOS token) before ``max_new_tokens`` ran out;
* ``repeated_ngram_rate``: share of word 4-grams that already occurred earlier in the answer
  (rep-n of Welleck et al., 2019; numbers are not words here, so list counters do not hide a
  loop): degenerate loops score near 1.

``new_tokens`` and ``stops`` are read from the generated token ids (``Scorer.generations``), never
from re-tokenising the answer's text (which need not give the same tokens back: a reply cut at
48 tokens could count 49).

``score_items`` -> ``aggregate`` over ``EvalConfig.chat.prompts`` is the suite (``SUITE``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hetray.eval.suite import Suite

NGRAM = 4
_WORD = re.compile(r"\w+")


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def repeats_prompt(prompt: str, response: str) -> bool:
    p, r = _norm(prompt), _norm(response)
    return bool(r) and (p in r or r in p)


def repeated_ngram_rate(text: str, n: int = NGRAM) -> float:
    # numbers are left out, so a numbered list that loops ("14. Asia 15. Asia") counts as a loop
    words = [w for w in _WORD.findall(text.lower()) if not w.isdigit()]
    grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def signals(prompt: str, response: str, eos: bool) -> dict:
    """The automatic signals of one answer (``eos``: its generation ended at an EOS token)."""
    return {
        "non_empty": bool(response.strip()),
        "repeats_prompt": repeats_prompt(prompt, response),
        "stops": bool(eos),
        "repeated_ngram_rate": repeated_ngram_rate(response),
    }


def score_items(scorer, prompts: list[str], max_new_tokens: int) -> list[dict]:
    # The prompt as the model was tuned to see it: one user turn of its chat template, if any.
    chat = bool(getattr(scorer.tokenizer, "chat_template", None))
    records = []
    for prompt, g in zip(prompts, scorer.generations(list(prompts), max_new_tokens, chat=chat)):
        records.append({"prompt": prompt, "response": g.text, "new_tokens": g.new_tokens,
                        **signals(prompt, g.text, g.eos)})
    return records


def aggregate(records: list[dict]) -> dict:
    n = len(records)
    if not n:
        return {"responses": 0}

    def mean(key):
        return sum(float(r[key]) for r in records) / n

    return {
        "responses": n,
        "non_empty_rate": mean("non_empty"),
        "prompt_repeat_rate": mean("repeats_prompt"),
        "stop_rate": mean("stops"),
        "repeated_ngram_rate": mean("repeated_ngram_rate"),
        "mean_new_tokens": mean("new_tokens"),
    }


def write_side_by_side(records_by_model: dict[str, list[dict]], out_dir) -> dict:
    """``chat.jsonl`` (one line per model and prompt) and ``chat.md`` (each prompt, then every
    model's answer). Returns their names in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "chat.jsonl", "w") as f:
        for model, records in records_by_model.items():
            for r in records:
                f.write(json.dumps({"model": model, **r}, ensure_ascii=False) + "\n")
    lines = ["# Instruction following: answers side by side", "",
             "| model | non-empty | repeats prompt | stops | repeated 4-grams | mean new tokens |",
             "|---|---|---|---|---|---|"]
    for model, records in records_by_model.items():
        a = aggregate(records)
        lines.append(f"| {model} | {a['non_empty_rate']:.2f} | {a['prompt_repeat_rate']:.2f} | "
                     f"{a['stop_rate']:.2f} | {a['repeated_ngram_rate']:.3f} | {a['mean_new_tokens']:.1f} |")
    prompts = list(dict.fromkeys(r["prompt"] for recs in records_by_model.values() for r in recs))
    for i, prompt in enumerate(prompts, 1):
        lines += ["", f"## {i}. {prompt}", ""]
        for model, records in records_by_model.items():
            for r in (r for r in records if r["prompt"] == prompt):
                flags = [f"{r['new_tokens']} tokens", "stops" if r["stops"] else "cut at max_new_tokens"]
                flags += ["EMPTY"] * (not r["non_empty"]) + ["repeats the prompt"] * r["repeats_prompt"]
                flags.append(f"repeated 4-grams {r['repeated_ngram_rate']:.2f}")
                lines += [f"**{model}** ({', '.join(flags)})", ""]
                lines += [f"> {line}" if line.strip() else ">" for line in (r["response"] or "(empty)").splitlines()]
                lines.append("")
    (out / "chat.md").write_text("\n".join(lines) + "\n")
    return {"chat_markdown": "chat.md", "chat_jsonl": "chat.jsonl"}


SUITE = Suite(
    name="chat", kind="policy", title="Instruction following: automatic signals (answers in chat.md)",
    columns=(("non_empty_rate", "non-empty", "higher"), ("prompt_repeat_rate", "repeats prompt", "lower"),
             ("stop_rate", "stops (EOS)", "higher"), ("repeated_ngram_rate", "repeated 4-grams", "lower"),
             ("mean_new_tokens", "mean new tokens", None)),
    load=lambda cfg, model=None: list(cfg.chat.prompts),
    score=lambda scorer, prompts, cfg: score_items(scorer, prompts, cfg.chat.max_new_tokens),
    aggregate=aggregate,
    plot_metrics=(("stop_rate", "chat: stops"), ("repeated_ngram_rate", "chat: repeated 4-grams")),
    write=write_side_by_side,
    link=("Every answer, side by side", "chat.md"),
    item_id=lambda r: r["prompt"],
)
