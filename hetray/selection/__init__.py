"""Steps 2-3 of the paper: quality and diversity. ``embed`` -> ``cluster`` (k-means) -> ``select``."""
