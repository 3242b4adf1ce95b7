"""The training console: one line per logging step, printed by the driver.

    sft    step 40/80  loss 2.104  lr 2.0e-04  12.3 s/it  ETA 8m12s

Every worker reports each log with ``ray.train.report`` (``worker.RayReport``: the logged
scalars, the step, the step budget and the seconds per step so far). The Ray Train controller
hands each report to ``Relay.after_report`` (a ``ray.train.UserCallback``; it runs in the
controller, not in the driver), which puts rank 0's metrics on a Ray queue; a thread of the
driver logs them (``progress_line``, logger ``hetray.train.progress`` at INFO: hetray's own
terminal lines) while ``TorchTrainer.fit`` runs (``Console``). Ray Train's own per-report log
line is switched off in the workers (``worker.train_loop``), and transformers' dict per log
(``PrinterCallback``) is removed from the trainer.
"""

from __future__ import annotations

import logging
import math
import threading

from ray.train import UserCallback

# a stage's own number beside the loss: (logged key, label); the first key present of a label wins
log = logging.getLogger(__name__)
EXTRAS = (("accuracy", "acc"), ("rewards/accuracies", "acc"), ("objective/scores", "score"), ("reward", "reward"),
          ("objective/kl", "kl"), ("kl", "kl"))


def duration(seconds: float) -> str:
    """``42s``, ``8m12s``, ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def progress_line(stage: str, m: dict) -> str | None:
    """The console line for one report (None: a checkpoint report, nothing to say)."""
    step, total, pace = m.get("step"), m.get("max_steps"), m.get("s_per_step")
    head = f"{stage:<6} "
    loss = m.get("loss", m.get("loss/policy_avg"))
    if _num(loss):
        parts = [f"step {step}/{total}" if total else f"step {step}", f"loss {loss:.3f}"]
        if _num(m.get("learning_rate")):
            parts.append(f"lr {m['learning_rate']:.1e}")
        labels = set()
        for key, label in EXTRAS:
            if label not in labels and _num(m.get(key)):
                parts.append(f"{label} {m[key]:.3g}")
                labels.add(label)
        if _num(pace):
            parts.append(f"{pace:.3g} s/it")
            if total and total > step:
                parts.append(f"ETA {duration(pace * (total - step))}")
        return head + "  ".join(parts)
    if _num(m.get("train_runtime")):
        done = f"done {step} steps in {duration(m['train_runtime'])}"
        return head + done + (f"  train loss {m['train_loss']:.3f}" if _num(m.get("train_loss")) else "")
    evals = [(k[len("eval_"):], v) for k, v in m.items() if k.startswith("eval_") and _num(v)
             and not k.endswith(("_runtime", "_per_second"))]
    if evals:
        return head + f"eval step {step}  " + "  ".join(f"{k} {v:.4g}" for k, v in evals[:4])
    return None


class Relay(UserCallback):
    """In the Ray Train controller: each report's rank-0 metrics -> the driver's queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        if metrics:
            try:
                self.queue.put_nowait(metrics[0])
            except Exception:  # noqa: BLE001 (a console line is never worth failing a training run)
                pass


class Console:
    """``with Console(stage) as console: TorchTrainer(..., RunConfig(callbacks=[console.relay]))``:
    one line per log while the block runs (``write``: default, the ``hetray.train.progress`` logger)."""

    def __init__(self, stage: str, write=None):
        self.stage, self.write = stage, write or log.info

    def __enter__(self) -> Console:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.relay = Relay(self.queue)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._print, name=f"hetray-{self.stage}-console", daemon=True)
        self.thread.start()
        return self

    def _print(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                metrics = self.queue.get(timeout=0.5)
            except Empty:
                if self.done.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 (the queue is gone: Ray shut down)
                return
            line = progress_line(self.stage, metrics)
            if line:
                self.write(line)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=30)
        self.queue.shutdown()
