"""One model loaded once, in this process or as ``eval.num_workers`` Ray actors, scoring suites.

With several actors a suite's items are split into contiguous chunks, one per actor, and the
records concatenated in item order; a suite's metrics come from its records alone, so they are
the ones one process gives (up to float rounding). The evaluation never starts Ray: with
``num_workers > 1`` the caller (``hetray eval``, the pipeline) must have started it.

A long suite (more than ``PROGRESS_STEPS`` batches per worker) is scored in about
``PROGRESS_STEPS`` consecutive slices of its items, with one log line after each: progress every
~10%, not a line per batch.
"""

from __future__ import annotations

import logging
import random
import time

from hetray.eval.config import EvalConfig
from hetray.eval.reward import RewardModel
from hetray.eval.scoring import Scorer
from hetray.eval.suites import SUITES


log = logging.getLogger(__name__)

PROGRESS_STEPS = 10


class EvalError(ValueError):
    """A model, suite or setting that cannot be evaluated; the message names it."""


class Worker:
    """One model, loaded once: a policy ``Scorer`` (kind "policy") or a ``RewardModel``
    ("reward"). Runs in this process or as a Ray actor."""

    def __init__(self, kind: str, path: str, cfg_json: dict, seed: int):
        from transformers import set_seed

        set_seed(seed)
        random.seed(seed)
        self.cfg = EvalConfig.model_validate(cfg_json)
        load = Scorer.load if kind == "policy" else RewardModel.load
        self.model = load(path, batch_size=self.cfg.batch_size, device=self.cfg.device)

    def ready(self) -> bool:
        return True

    def score(self, suite: str, items: list) -> list[dict]:
        return SUITES[suite].score(self.model, items, self.cfg)


class Pool:
    """``num_workers`` copies of a model (Ray actors), or one in this process when it is 1."""

    def __init__(self, kind: str, name: str, path: str, cfg: EvalConfig, seed: int):
        self.actors, self.local = [], None
        self.batch_size = cfg.batch_size
        cfg_json = cfg.model_dump(mode="json")
        try:
            if cfg.num_workers == 1:
                self.local = Worker(kind, path, cfg_json, seed)
                return
            import ray

            if not ray.is_initialized():
                raise EvalError(f"eval.num_workers > 1 needs a running Ray: start it first (`hetray eval` and "
                                f"`hetray run` do), or set eval.num_workers=1 (got {cfg.num_workers})")
            # Ray leaves every GPU visible to an actor that asked for none: pin the device
            if cfg.device == "cuda" and not cfg.num_gpus_per_worker:
                raise EvalError("eval.device=cuda with num_workers > 1 needs eval.num_gpus_per_worker > 0")
            cfg_json["device"] = "cuda" if cfg.num_gpus_per_worker else "cpu"
            have = ray.cluster_resources()
            for res, each in (("CPU", 1), ("GPU", cfg.num_gpus_per_worker)):
                if cfg.num_workers * each > have.get(res, 0):
                    raise EvalError(f"eval.num_workers={cfg.num_workers} actors need {cfg.num_workers * each:g} "
                                    f"{res}s, the Ray cluster has {have.get(res, 0):g}")
            actor = ray.remote(num_cpus=1, num_gpus=cfg.num_gpus_per_worker)(Worker)
            self.actors = [actor.remote(kind, path, cfg_json, seed) for _ in range(cfg.num_workers)]
            ray.get([a.ready.remote() for a in self.actors])
        except EvalError:
            raise
        except Exception as e:
            self.close()
            raise EvalError(f"model {name!r} ({path}) could not be loaded: {_cause(e)}") from e

    def score(self, suite: str, items: list, label: str | None = None) -> list[dict]:
        """One record per item, in item order. ``label`` (e.g. "eval sft winobias"): log the
        progress of a long suite about every 10% of its items."""
        n = len(items)
        step = max(-(-n // PROGRESS_STEPS), self.batch_size * max(1, len(self.actors)))
        if label is None or step >= n:
            return self._score(suite, items)
        records, started = [], time.time()
        for start in range(0, n, step):
            records += self._score(suite, items[start:start + step])
            log.info("%s: %d/%d items (%d%%), %.0f s", label, len(records), n, 100 * len(records) // n,
                     time.time() - started)
        return records

    def _score(self, suite: str, items: list) -> list[dict]:
        if self.local is not None:
            return self.local.score(suite, items)
        import ray

        chunks = split_evenly(items, len(self.actors))
        parts = ray.get([a.score.remote(suite, c) for a, c in zip(self.actors, chunks) if c])
        return [r for part in parts for r in part]

    def close(self) -> None:
        if self.actors:
            import ray

            for a in self.actors:
                ray.kill(a)
        self.actors, self.local = [], None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _cause(e: Exception) -> str:
    """The original error inside a Ray wrapper, in one line."""
    inner = getattr(e, "cause", None) or getattr(e, "__cause__", None)
    return f"{type(inner or e).__name__}: {inner or e}".splitlines()[0][:500]


def split_evenly(items: list, n: int) -> list[list]:
    """``n`` contiguous chunks whose sizes differ by at most one (concatenated: ``items``)."""
    size, rest = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < rest)
        out.append(items[start:end])
        start = end
    return out
