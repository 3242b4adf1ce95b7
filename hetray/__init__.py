"""hetray: fine-tune LLMs from heterogeneous human feedback on Ray (Aponte et al., 2024).

The package is laid out as the paper's steps, over a few shared modules:

    unify/        every dataset -> (prompt, chosen, rejected) pairs        (convert)
    selection/    embeddings, k-means, the top fraction of each cluster     (embed, cluster, select)
    train/        SFT, reward model, PPO / RLOO / DPO on Ray Train          (sft, reward, ppo, rloo, dpo)
    eval/         WinoBias / WinoGender / WinoGrande / reward / chat suites and the report
    orchestrate/  the conductor: `hetray run`, grids of runs, Ray Tune, sync

    config.py  stage.py (the one stage runner)  models.py  pairs.py  schema.py  plots.py  cli.py
"""

from importlib import metadata

try:
    __version__ = metadata.version("hetray")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
