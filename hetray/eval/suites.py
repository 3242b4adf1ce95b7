"""Every evaluation suite, by name, in report order (each is declared in its own module)."""

from __future__ import annotations

from hetray.eval import chat, reward, winobias, winogender, winogrande
from hetray.eval.config import SUITE_NAMES

SUITES = {s.name: s for s in (winobias.SUITE, winogender.SUITE, winogrande.SUITE, reward.SUITE, chat.SUITE)}
assert tuple(SUITES) == SUITE_NAMES, f"hetray.eval.config.SUITE_NAMES {SUITE_NAMES} != the suites {tuple(SUITES)}"
