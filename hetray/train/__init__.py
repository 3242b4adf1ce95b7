"""Training stages on Ray Train: ``sft`` -> ``reward`` -> ``ppo`` | ``rloo`` | ``dpo``.

Each stage module has one entry point, ``run_<stage>(cfg, force=False) -> manifest``; the
settings live in ``hetray.train.config`` and the shared Ray Train plumbing in ``common``.
"""
