"""Line formats of published data sets that more than one wing reads.

``hf:ORG/NAME[:SPLIT[:CONFIG]]`` paths are parsed here too: convert and eval accept the same forms.

WinoBias lines are read by the convert stage (anti-stereotype sentence chosen, for training) and
by the evaluation (the bias suites): both parse them here.
"""

from __future__ import annotations

import re

_NUMBERED = re.compile(r"^\s*(\d+)(?:\s+(.*))?$")
_CLUSTER = re.compile(r"\[([^\[\]]*)\]")


def parse_winobias_line(text: str) -> tuple[int | None, str, list[str]]:
    """``"<n> <sentence>"`` -> ``(n, sentence without brackets, clusters)``.

    ``n`` is None when the line has no leading number. ``clusters`` are the bracket contents in
    order (stripped). Whitespace is collapsed to single spaces. Raises ValueError on brackets
    that do not pair up.
    """
    m = _NUMBERED.match(text)
    n, sentence = (int(m.group(1)), m.group(2) or "") if m else (None, text)
    clusters = [c.strip() for c in _CLUSTER.findall(sentence)]
    rest = _CLUSTER.sub(lambda c: c.group(1), sentence)
    if "[" in rest or "]" in rest:
        raise ValueError(f"unbalanced brackets in {text!r}")
    return n, " ".join(rest.split()), clusters


HUB_PREFIX = "hf:"
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark: dropped from the start of every text input


def is_hub(path) -> bool:
    """``path`` names a Hugging Face hub dataset (``hf:...``), not a local file."""
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def hub_spec(spec: str) -> tuple[str, str, str | None]:
    """``hf:ORG/NAME[:SPLIT[:CONFIG]]`` -> (name, split, config), e.g.
    ``hf:allenai/winogrande:train:winogrande_xl``."""
    name, _, rest = spec[len(HUB_PREFIX):].partition(":")
    split, _, config = rest.partition(":")
    return name, split or "train", config or None
