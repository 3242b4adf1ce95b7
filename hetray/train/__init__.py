"""Training stages on Ray Train: ``sft`` -> ``reward`` -> ``ppo`` | ``rloo`` | ``dpo``.

Each stage module has one entry point, ``run_<stage>(cfg, force=False) -> manifest``; the
settings live in ``config``, the driver side of Ray Train in ``driver`` and what runs in each
worker in ``worker``.
"""

STAGES = ("sft", "reward", "ppo", "rloo", "dpo")  # the chain's order
RLHF_STAGES = ("ppo", "rloo", "dpo")  # policy stages after SFT; a run trains at most one
