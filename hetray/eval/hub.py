"""Eval data from the Hugging Face hub: ``hf:ORG/NAME[:SPLIT[:CONFIG]]``, the form convert reads.

    eval.winogrande.path: hf:allenai/winogrande:validation:winogrande_xl

``hub_rows(spec)`` loads the split with ``datasets.load_dataset(name, config, split=split)`` (the
network, or the local Hugging Face cache) and gives its rows as dicts: the same fields a suite
reads from its local file (WinoGrande: ``sentence``, ``option1``, ``option2``, ``answer``). When
the dataset cannot be loaded (offline, no such dataset) the error names the spec and says what to
do instead. The spec is parsed by the parser convert uses (``hetray.formats.hub_spec``), so
both stages read the same strings the same way.
"""

from __future__ import annotations

from hetray.formats import is_hub  # noqa: F401 - the suites import it from here
from hetray.formats import hub_spec as parse


class HubDataError(ValueError):
    """An ``hf:`` eval path that cannot be loaded."""


def hub_rows(spec: str, what: str = "eval data") -> list[dict]:
    """Every row of the dataset split named by ``spec``, as dicts."""
    name, split, config = parse(spec)
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, no such repo / config / split: one clear message
        raise HubDataError(
            f"{what} {spec!r}: could not load the Hugging Face dataset {name!r} (config {config!r}, split "
            f"{split!r}): the hub is not reachable from here (offline?) and it is not in the local cache, or it "
            f"does not exist. Download it, or give a local file. Cause: {type(e).__name__}: {e}") from None
    return [dict(row) for row in ds]
