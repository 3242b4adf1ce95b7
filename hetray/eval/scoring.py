"""A causal LM for scoring and greedy generation: batched, padded, deterministic.

Every suite goes through :class:`Scorer`; it hides padding, batching and devices.

* Prompts are raw text. A prompt is tokenised with the tokenizer's special tokens (a BOS for
  models that use one), unless it already starts with the BOS text (a chat-template output).
  ``generate(..., chat=True)`` wraps each prompt as one user message in the tokenizer's chat
  template first (``add_generation_prompt=True``).
* Batches are left-padded with explicit ``position_ids`` (cumulative attention mask), so a padded
  row gets the same positions, and up to float rounding the same numbers, as the prompt alone.
  Inside a call, prompts are sorted by token length (longest first) so that a batch holds
  similar lengths, and results come back in input order.
* Continuation rule (``continuation_logprobs`` / ``score``): ``prompt + continuation`` is
  tokenised as ONE string, and the continuation's tokens are every token from the first one
  whose character span ends after ``len(prompt)``. So a token that straddles the boundary
  (a trailing space of the prompt merged into ``" the"``) belongs to the continuation, and its
  context is the tokens before it: ``'... refers to: ' + 'the developer'`` scores ``" the"``,
  ``" developer"`` after ``'... refers to:'``. Tokenizers without offsets (slow ones) split at
  ``len(tokenize(prompt))`` instead.
* fp32 on CPU; bf16 on CUDA when the GPU supports it (else fp32). ``torch.inference_mode``.
  Generation is greedy (``do_sample=False``), so runs repeat exactly on one machine.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch

from hetray.models import ModelNotFoundError, load_causal_lm


class Scorer:
    """A causal LM for scoring and greedy generation; batched, padded, deterministic."""

    def __init__(self, model, tokenizer, batch_size: int = 16, device: str = "cpu", threads: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer  # with a pad token (hetray.models sets one)
        self.batch_size = batch_size
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        if self.device.type == "cpu":
            _set_cpu_threads(threads)

    @classmethod
    def load(cls, name_or_path: str, batch_size: int = 16, device: str = "auto",
             threads: int | None = None) -> "Scorer":
        """A bundled alias, a local checkpoint, a LoRA adapter folder (merged onto its base), or a
        hub id. Raises ModelNotFoundError / ValueError naming the model when it cannot load.
        ``threads``: torch CPU threads (None: one per core this process may use)."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        try:
            model, tokenizer = load_causal_lm(name_or_path)
        except ModelNotFoundError:
            raise
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load model {name_or_path!r} as a causal LM: {e}") from e
        return cls(model.to(dtype), tokenizer, batch_size=batch_size, device=device, threads=threads)

    # ------------------------------------------------------------------ scoring

    def continuation_logprobs(self, prompts: list[str], continuations: list[str]) -> list[list[float]]:
        """Per-token log-probs of each continuation given its prompt (see the module's rule)."""
        return self.score(prompts, continuations, next_token=False)[0]

    def continuation_token_ids(self, prompt: str, continuation: str) -> list[int]:
        """The token ids that the module's rule assigns to ``continuation`` after ``prompt``."""
        ids, start = self._split(prompt, continuation)
        return ids[start:]

    def score(self, prompts: list[str], continuations: list[str], next_token: bool = True):
        """``(continuation_logprobs, next)`` in one forward pass per batch. ``next`` is the [n, vocab]
        log-softmax at the position that predicts the continuation's first token (the context
        of the module's rule), or None when ``next_token`` is False."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        split = [self._split(p, c) for p, c in zip(prompts, continuations)]
        seqs = [ids for ids, _ in split]
        scored: list[list[float]] = [[] for _ in prompts]
        nxt = torch.empty(len(prompts), self._vocab_size(), dtype=torch.float32) if next_token else None
        for idx in self._batches(seqs):
            n_cont = [len(seqs[i]) - split[i][1] for i in idx]
            keep = max(n_cont) + 1
            logp = self._logprobs([seqs[i] for i in idx], keep=keep)  # last `keep` positions
            for row, (i, c) in enumerate(zip(idx, n_cont)):
                # position keep-1-c predicts the first continuation token; keep-1 predicts nothing
                first = keep - 1 - c
                targets = torch.tensor(seqs[i][len(seqs[i]) - c:], dtype=torch.long)
                scored[i] = logp[row, first:first + c].gather(1, targets[:, None])[:, 0].tolist()
                if nxt is not None:
                    nxt[i] = logp[row, first]
        return scored, nxt

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[str], max_new_tokens: int, chat: bool = False, stop_when=None) -> list[str]:
        """Greedy continuations (new text only, special tokens dropped); see ``generations``."""
        return [g.text for g in self.generations(prompts, max_new_tokens, chat=chat, stop_when=stop_when)]

    def generations(self, prompts: list[str], max_new_tokens: int, chat: bool = False,
                    stop_when=None) -> list["Generation"]:
        """Greedy continuations with what the generated token ids say: how many tokens the model
        generated (EOS not counted, so at most ``max_new_tokens``) and whether it stopped at an EOS
        (one of the ids ``generate`` stops on). ``chat=True``: each prompt is a user message for the
        chat template. ``stop_when(new_text) -> bool``: a row may stop once it is True (its text is
        not cut); a batch stops when every row has (an early stop only saves time)."""
        from transformers import StoppingCriteriaList

        texts = [self._chat(p) for p in prompts] if chat else list(prompts)
        seqs = [self._encode(t) for t in texts]
        if any(len(s) == 0 for s in seqs):
            raise ValueError("cannot generate from an empty prompt")
        eos = self._eos_ids()
        out: list[Generation] = [Generation("", 0, False)] * len(prompts)
        for idx in self._batches(seqs):
            ids, mask = self._pad([seqs[i] for i in idx])
            stops = StoppingCriteriaList([_StopWhen(self.tokenizer, ids.shape[1], stop_when)]) if stop_when else None
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                    temperature=None, top_p=None, top_k=None,
                    pad_token_id=self.tokenizer.pad_token_id, stopping_criteria=stops,
                )
            for i, row in zip(idx, gen[:, ids.shape[1]:].tolist()):
                out[i] = self._generation(row, eos, trailing_pad=stop_when is not None)
        return out

    def _generation(self, row: list[int], eos: set[int], trailing_pad: bool) -> "Generation":
        """One row of new token ids -> Generation. After a row stops, ``generate`` fills it with the
        pad id; a row that stopped at an EOS ends at its first EOS, one stopped by ``stop_when``
        at its trailing pads."""
        cut = next((k for k, t in enumerate(row) if t in eos), None)
        stopped = cut is not None
        if cut is None:
            cut = len(row)
            pad = self.tokenizer.pad_token_id
            while trailing_pad and cut and row[cut - 1] == pad:
                cut -= 1
        return Generation(self.tokenizer.decode(row[:cut], skip_special_tokens=True), cut, stopped)

    def _eos_ids(self) -> set[int]:
        """The token ids ``generate`` stops at (the model's generation config)."""
        ids = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if ids is None:
            return set()
        return {int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])}

    # ------------------------------------------------------------------ internals

    def _encode(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token
        special = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _chat(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    def _split(self, prompt: str, continuation: str) -> tuple[list[int], int]:
        """Token ids of ``prompt + continuation`` and the index of the continuation's first token."""
        text = prompt + continuation
        bos = self.tokenizer.bos_token
        special = not (bos and text.startswith(bos))
        if not getattr(self.tokenizer, "is_fast", True):  # no offsets: split by the prompt's own ids
            ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
            start = len(self._encode(prompt))
        else:
            enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
            ids = enc["input_ids"]
            ends = [end if end > start_ else -1 for start_, end in enc["offset_mapping"]]  # specials: -1
            start = next((k for k, end in enumerate(ends) if end > len(prompt)), len(ids))
        if start == 0:
            raise ValueError(f"prompt {prompt!r} leaves no token before the continuation {continuation!r}")
        return ids, start

    def _batches(self, seqs: list[list[int]]):
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # stable: ties keep input order
        for k in range(0, len(order), self.batch_size):
            yield order[k:k + self.batch_size]

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s):] = 1
        return ids, mask

    def _logprobs(self, seqs: list[list[int]], keep: int) -> torch.Tensor:
        """[b, keep, vocab] float32 cpu log-softmax at the last ``keep`` positions (left padded)."""
        ids, mask = self._pad(seqs)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        kwargs = {"logits_to_keep": keep} if self._keep_arg else {}
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device), use_cache=False, **kwargs,
            ).logits[:, -keep:]
            return logits.float().log_softmax(-1).cpu()

    def _vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]


@dataclass(frozen=True)
class Generation:
    """One greedy continuation, counted on the generated token ids (never re-tokenised)."""

    text: str  # the new text, special tokens dropped
    new_tokens: int  # tokens generated before the EOS (EOS not counted): at most max_new_tokens
    eos: bool  # generation ended by an EOS token, not by max_new_tokens


class _StopWhen:
    """A stopping criterion: a row is done once ``test(its new text)`` is True."""

    def __init__(self, tokenizer, prompt_width: int, test):
        self.tokenizer, self.start, self.test = tokenizer, prompt_width, test

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([bool(self.test(t)) for t in texts], device=input_ids.device)


def _set_cpu_threads(threads: int | None) -> None:
    """``threads`` torch threads, or one per core this process may use (not per core of the
    machine). On a machine shared with other jobs fewer can be faster: torch's threads wait for
    each other at every op, and a descheduled one stalls the rest (measured on 2 shared cores:
    1 thread scored 3-5x faster than 2 at a load average of 10)."""
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            threads = os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
