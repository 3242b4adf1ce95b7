"""Source adapters: one module per published format. See ``base`` for the contract."""

from hetray.unify.sources import generic, hh, oasst, winobias, winogender, winogrande

# format tag -> (adapter module, its settings class)
ADAPTERS = {
    "winogrande": (winogrande, winogrande.Settings),
    "oasst": (oasst, oasst.Settings),
    "hh": (hh, hh.Settings),
    "winobias": (winobias, winobias.Settings),
    "winogender": (winogender, winogender.Settings),
    "generic": (generic, generic.Settings),
}


def adapter_for(settings):
    return ADAPTERS[settings.format][0]
