"""The terminal a person reads, and the log file that keeps everything else.

``hetray`` prints its own lines (the ``hetray`` loggers at INFO: a stage starting and ending
with its wall time, what a stage did, where the outputs are) and errors. Everything else goes to
``<run_dir>/logs/hetray.log``: hetray at DEBUG, Ray's own loggers on the driver (Ray Data's
execution plans and progress, Ray Train, Ray Tune), the stdout/stderr of every Ray worker (Ray
forwards it to the driver; ``route_worker_output`` writes it to the file instead of the
terminal), and Python warnings. Ray's session logs (``/tmp/ray/session_*/logs``) hold the rest.
``hetray -v`` puts Ray's output back on the terminal.

A line a Ray worker prints that starts with ``[hetray] `` is a line for the terminal too (the
marker is dropped); a worker's log is otherwise only in the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from pathlib import Path

WORKER_MARK = "[hetray] "  # a worker line that starts with this is shown on the terminal
LOG_FILE = Path("logs") / "hetray.log"  # in the run directory

_state = {"verbose": False, "file": None}  # the file handler, when a run directory is known


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest's capture swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property decides
        pass


def _is_hetray(record: logging.LogRecord) -> bool:
    return record.name == "hetray" or record.name.startswith("hetray.")


class _ConsoleFilter(logging.Filter):
    """hetray's lines at INFO (DEBUG with -v) and anyone's errors; with -v, everyone's INFO."""

    def filter(self, record):
        if _is_hetray(record):
            return record.levelno >= (logging.DEBUG if _state["verbose"] else logging.INFO)
        return record.levelno >= (logging.INFO if _state["verbose"] else logging.ERROR)


class _FileFilter(logging.Filter):
    def filter(self, record):
        return record.levelno >= (logging.DEBUG if _is_hetray(record) else logging.INFO)


class _ConsoleFormat(logging.Formatter):
    """``12:03:04 message``; a warning or error says so, and another library's line its logger."""

    def format(self, record):
        head = self.formatTime(record, "%H:%M:%S")
        if record.levelno >= logging.WARNING:
            head += f" {record.levelname}"
        if not _is_hetray(record):
            head += f" {record.name}:"
        text = f"{head} {record.getMessage()}"
        if record.exc_info and _state["verbose"]:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(verbose: bool = False) -> None:
    """Route logging for one ``hetray`` command (idempotent: tests call ``main`` many times)."""
    _state["verbose"] = verbose
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_hetray", False):
            root.removeHandler(h)
            h.close()
    _state["file"] = None
    console = _Stderr()
    console._hetray = True
    console.addFilter(_ConsoleFilter())
    console.setFormatter(_ConsoleFormat())
    root.addHandler(console)
    root.setLevel(logging.DEBUG)
    for noisy in ("urllib3", "filelock", "fsspec", "matplotlib", "PIL", "asyncio", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # their DEBUG would flood the file
    logging.getLogger("hetray").setLevel(logging.DEBUG)
    logging.captureWarnings(not verbose)  # FutureWarnings and the like: the file, not the terminal
    if not verbose and not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a bar in a pipe is a wall of text


def attach_log_file(run_dir: str | os.PathLike) -> Path:
    """Append everything to ``<run_dir>/logs/hetray.log`` from now on. Returns its path."""
    root = logging.getLogger()
    old = _state["file"]
    if old is not None:
        root.removeHandler(old)
        old.close()
    path = Path(run_dir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler._hetray = True
    handler.addFilter(_FileFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    _state["file"] = handler
    logging.getLogger("hetray.console").debug(
        "==== hetray %s (pid %d, %s)", " ".join(sys.argv[1:]), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S"))
    return path


def shown(path) -> str:
    """A path as a person reads it: relative to the working directory when it lies inside it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def log_file() -> Path | None:
    handler = _state["file"]
    return Path(handler.baseFilename) if handler is not None else None


def verbose() -> bool:
    return _state["verbose"]


# ---------------------------------------------------------------------------- Ray


def adopt_ray_loggers() -> None:
    """Ray's driver-side loggers (``ray``, ``ray.data``, ...) print to the terminal through their
    own handlers; hand their records to ours instead (the log file; the terminal with -v or at
    ERROR). Ray Data keeps its own file in the session directory."""
    import ray._private.log  # noqa: F401  (sets up the "ray" logger on import: do that first)

    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.air"):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if type(h) is logging.StreamHandler or isinstance(h, ray._private.log.PlainRayHandler):
                logger.removeHandler(h)
        logger.propagate = True


def quiet_ray_data() -> None:
    """Ray Data: one progress bar per dataset on a terminal (none in a pipe: Ray logs its
    progress there instead, to the file); its per-operator bars only with -v. k-means turns
    its own off for its passes (``hetray.selection.kmeans``)."""
    from ray.data import DataContext

    adopt_ray_loggers()  # importing ray.data configured its logger afresh
    if not _state["verbose"]:  # Ray's tqdm: one line per dataset, its final state left
        DataContext.get_current().enable_operator_progress_bars = False


def route_worker_output() -> None:
    """Ray forwards what its workers print to the driver, which prints it; write it to the log
    file instead (and to the terminal a line marked ``[hetray] ``, a raylet's warning, an
    autoscaler event). With -v, or a Ray without this hook, Ray prints it as it does by default."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    if not _state["verbose"]:
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.remove_handler("hetray")
        dispatcher.add_handler("hetray", _worker_lines)


_workers = logging.getLogger("ray.workers")  # a worker's lines in the file, named by Ray's prefix
_marked = logging.getLogger("hetray.workers")  # marked worker lines: the terminal too


def _worker_lines(data: dict) -> None:
    pid = data.get("pid")
    if pid == "autoscaler":
        _autoscaler(data.get("lines", []))
        return
    who = data.get("actor_name") or data.get("task_name") or ""
    ip = "" if data.get("ip") == data.get("localhost") else f", ip={data.get('ip')}"
    prefix = f"({who + ' ' if who else ''}pid={pid}{ip})"
    for line in data.get("lines", []):
        if not line.strip() or line.startswith('{"__magic_token__'):  # tqdm_ray's JSON state updates
            continue
        if WORKER_MARK in line:
            _marked.info(line.split(WORKER_MARK, 1)[1])
        elif pid == "raylet":  # rare and worth seeing: a worker killed for memory, ...
            _marked.warning("ray raylet: %s", line)
        else:
            _workers.info("%s %s", prefix, line)


def _autoscaler(lines: list[str]) -> None:
    """Only its events; its status table (every 5 s) is in the session's monitor.log."""
    try:
        from ray._private.worker import filter_autoscaler_events

        for event in filter_autoscaler_events(lines):
            if not event.startswith("Tip: use `ray status`"):
                _marked.warning("ray autoscaler: %s", event)
    except Exception:  # noqa: BLE001  (another Ray's format: monitor.log still has them)
        pass


class _LogLines(io.TextIOBase):
    """A text stream that logs each line it is given."""

    def __init__(self, logger: logging.Logger):
        self._logger, self._buffer = logger, ""

    def writable(self):
        return True

    def write(self, text):
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            if line.strip():
                self._logger.info(line)
        return len(text)

    def flush(self):
        if self._buffer.strip():
            self._logger.info(self._buffer)
        self._buffer = ""


@contextlib.contextmanager
def printed_to_log(name: str):
    """What a library prints to stdout meanwhile goes to the log file (as logger ``name``), unless
    -v: Ray Tune prints its experiment box and paths even at ``verbose=0``."""
    if _state["verbose"]:
        yield
        return
    stream = _LogLines(logging.getLogger(name))
    with contextlib.redirect_stdout(stream):
        try:
            yield
        finally:
            stream.flush()
