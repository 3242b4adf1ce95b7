"""The ``hetray eval`` command-line options, apart from ``hetray.eval.run``: building the
``hetray`` parser must not import torch (1.3 s of every ``hetray convert``)."""

from __future__ import annotations

from hetray.eval.config import SUITE_NAMES


def add_arguments(p) -> None:
    """The ``hetray eval`` options (``p``: an argparse parser or subparser)."""
    p.add_argument("--models", required=True,
                   help="name=model,... : a bundled alias, a checkpoint or LoRA adapter folder, or a hub id "
                        "(e.g. base=smollm2-135m-instruct,sft=runs/x/sft/merged)")
    p.add_argument("--suites", help=f"comma-separated, of {','.join(SUITE_NAMES)} (default: eval.suites of the config)")
    p.add_argument("--config", help="job YAML whose eval: section (and seed) to use (default: the EvalConfig defaults)")
    p.add_argument("--out", default="eval", help="output folder (default: eval/)")
    p.add_argument("--reward-model", help="reward model for the reward suite: a run's reward/ folder or a checkpoint")
    p.add_argument("--seed", type=int, help="default: the job's seed, else 0")
    p.add_argument("overrides", nargs="*", help="eval settings, e.g. batch_size=8 winogrande.limit=20 (eval. prefix optional)")
