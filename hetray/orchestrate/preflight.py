"""Checks a job must pass before its first stage runs.

``check_no_contamination``: a job never evaluates on data it trained on. Every file an eval suite
reads (``Suite.files``) is compared, by path and by content, with every file of the sources the
job trains on. The one allowed overlap is a deterministic split: a WinoGrande source with
``holdout: h`` trains on the rows ``eval.winogrande.holdout: h`` does not score
(``hetray.pairs.holdout`` of the ``qID``).
"""

from __future__ import annotations

import os
from pathlib import Path

from hetray.config import ConfigError, JobConfig
from hetray.stage import content_hash


def _identity(path: str) -> tuple[str, str]:
    return os.path.realpath(path), content_hash(path)


def training_files(cfg: JobConfig, runs) -> dict[int, list[str]]:
    """{index in convert.sources: its local files} for the sources some run trains on."""
    from hetray.unify.convert import resolve_files

    trained = {s for r in runs if r.train for s in (r.sources or [src.name for src in cfg.convert.sources])}
    out = {}
    for i, s in enumerate(cfg.convert.sources):
        paths = [s.path] if isinstance(s.path, str) else list(s.path)
        if s.name not in trained or any(p.startswith("hf:") for p in paths):
            continue
        try:
            out[i] = resolve_files(s.path)
        except ValueError:  # a missing input fails in its stage, with its own message
            continue
    return out


def check_no_contamination(cfg: JobConfig, runs) -> None:
    """Raise ConfigError when an eval suite reads a file that a trained-on source reads."""
    if "eval" not in cfg.pipeline.stages or not any(r.train for r in runs):
        return
    from hetray.eval.suites import SUITES

    sources = training_files(cfg, runs)
    if not sources:
        return
    seen: dict[tuple[str, str] | str, int] = {}
    for i, files in sources.items():
        for f in files:
            real, digest = _identity(f)
            seen[real], seen[digest] = i, i
    for name in cfg.eval.suites:
        for f in SUITES[name].files(cfg.eval):
            if not Path(f).is_file():
                continue
            real, digest = _identity(f)
            i = seen.get(real, seen.get(digest))
            if i is None:
                continue
            s = cfg.convert.sources[i]
            split = getattr(s, "holdout", None)
            if name == "winogrande" and s.format == "winogrande" and split is not None \
                    and cfg.eval.winogrande.holdout == split:
                continue  # trained on the rest of the file: the split is deterministic
            hint = ("set convert.sources[{i}].holdout and eval.winogrande.holdout to the same share "
                    "(a split by qID), or evaluate on another file" if name == "winogrande"
                    else f"evaluate on other files (eval.{name}) or drop the source").format(i=i)
            raise ConfigError(
                f"eval suite {name!r} reads {f}, which source {s.name!r} (convert.sources[{i}]) trains on: "
                f"a job never evaluates on data it trained on; {hint}")
