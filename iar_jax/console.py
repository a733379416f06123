"""What the `iar-jax` commands show and check: input and output paths checked before any expensive
work (one-line errors naming the flag and the fix), the live training progress line, and the run's
config written to WORKDIR/config.json instead of the log."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from typing import Dict, Optional


# ----------------------------------------------------------------------------------------------
# Paths, checked before anything is loaded, compiled or written


def check_input(path: Optional[str], flag: str, kind: str = "any", fix: str = "") -> str:
    """An existing input path: `kind` file, dir or any. Raises ValueError naming `flag` otherwise."""
    fix = f"; {fix}" if fix else ""
    if not path:
        raise ValueError(f"{flag} is empty{fix}")
    if not os.path.exists(path):
        raise ValueError(f"{flag}={path}: no such file or directory{fix}")
    if kind == "file" and not os.path.isfile(path):
        raise ValueError(f"{flag}={path} is a directory, not a file{fix}")
    if kind == "dir" and not os.path.isdir(path):
        raise ValueError(f"{flag}={path} is a file, not a directory{fix}")
    return path


def _nearest_existing(path: str) -> str:
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def _check_writable(folder: str, flag: str, path: str) -> None:
    if not os.path.isdir(folder):
        raise ValueError(f"{flag}={path}: {folder} is a file, not a directory; choose another path")
    try:  # an unlinked temporary file: the only reliable test (root ignores permission bits)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{flag}={path}: cannot write in {folder} ({e.strerror}); choose a writable location") from None


def check_output_dir(path: Optional[str], flag: str) -> str:
    """A directory the command may create or add to: not a file, and writable (nothing is created)."""
    if not path:
        raise ValueError(f"{flag} is empty; pass the output directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag}={path} is a file, not a directory; choose a directory (nothing is overwritten)")
    _check_writable(_nearest_existing(path), flag, path)
    return path


def check_output_file(path: str, flag: str, exist_ok: bool = True) -> str:
    """A file the command will write: not a directory, in a writable place (nothing is created)."""
    if os.path.isdir(path):
        raise ValueError(f"{flag}={path} is a directory; pass a file path")
    if not exist_ok and os.path.exists(path):
        raise ValueError(f"{flag}={path} exists; choose a new file (nothing is overwritten)")
    _check_writable(_nearest_existing(os.path.dirname(os.path.abspath(path))), flag, path)
    return path


def check_config_paths(config, fields: Dict[str, str]) -> None:
    """Files named by config fields ({dotted key: file | dir | any}) exist when they are set."""
    for key, kind in fields.items():
        node = config
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node:
            check_input(str(node), f"--config.{key}", kind)


# ----------------------------------------------------------------------------------------------
# Quiet libraries


@contextlib.contextmanager
def native_stderr_silenced():
    """fd 2 to /dev/null (C++ libraries write there directly, past sys.stderr)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow_quietly() -> None:
    """TensorFlow (imported by clu's metric writers) prints absl's "before InitializeLog" warning and
    a oneDNN note at import, twice, whatever TF_CPP_MIN_LOG_LEVEL says; hide them unless logging
    at INFO (--verbosity=0)."""
    from absl import logging

    if "tensorflow" in sys.modules or logging.get_verbosity() >= logging.INFO:
        return
    with native_stderr_silenced():
        import tensorflow  # noqa: F401


# ----------------------------------------------------------------------------------------------
# The run's config


def write_config_json(config, workdir: str) -> str:
    """WORKDIR/config.json; a different earlier one is kept as config.N.json (nothing is lost)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=1, sort_keys=True) + "\n"
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return path
        n = 1
        while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
            n += 1
        os.replace(path, os.path.join(workdir, f"config.{n}.json"))
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


# ----------------------------------------------------------------------------------------------
# Progress


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressLine:
    """`step 120/300  loss 5.1234  3.21 steps/s  ETA 0:00:56`.

    On a terminal the line is redrawn in place at least every `redraw_secs` (a timer thread keeps
    it alive through long steps); elsewhere (logs, pipes) one line is printed per log interval.
    `on_step(step, metrics)` is called every step; it only reads a device value when it redraws.
    `on_log(step, mean_metrics)` is the trainers' log_fn."""

    def __init__(self, total: int, stream=None, live: Optional[bool] = None, redraw_secs: float = 2.0,
                 name: str = ""):
        self.total, self.stream = int(total), stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.redraw_secs, self.name = redraw_secs, name
        self.start_step: Optional[int] = None
        self.t0 = self.last_draw = time.time()
        self.step, self.loss = 0, None
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = None
        if self.live:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()

    def text(self, now: Optional[float] = None) -> str:
        now = time.time() if now is None else now
        done = self.step - (self.start_step or 0)
        rate = done / max(now - self.t0, 1e-9) if done > 0 else 0.0
        eta = _hms((self.total - self.step) / rate) if rate > 0 else "?"
        loss = f"loss {self.loss:.4f}" if self.loss is not None else "loss ?"
        prefix = f"{self.name}: " if self.name else ""
        return f"{prefix}step {self.step}/{self.total}  {loss}  {rate:.3g} steps/s  ETA {eta}"

    def _draw(self, final: bool = False) -> None:
        with self._lock:
            end = "\n" if (final or not self.live) else ""
            self.stream.write(("\r\033[K" if self.live else "") + self.text() + end)
            self.stream.flush()
            self.last_draw = time.time()

    def _tick(self) -> None:
        while not self._stop.wait(self.redraw_secs):
            self._draw()

    def on_step(self, step: int, metrics=None) -> None:
        if self.start_step is None:  # rates count from the first step run here (resume, compile)
            self.start_step, self.t0 = step - 1, time.time()
        self.step = step
        if self.live and time.time() - self.last_draw >= self.redraw_secs / 2 and metrics is not None:
            self.loss = float(metrics["loss"])  # a sync, at most every redraw_secs / 2
            self._draw()

    def on_log(self, step: int, mean: Dict[str, float]) -> None:
        self.step, self.loss = step, mean.get("loss", self.loss)
        if not self.live:
            self._draw()

    def close(self) -> None:
        self._stop.set()
        if self.live and self.step:
            self._draw(final=True)


def progress_hooks(total: int, name: str = "", enabled: bool = True) -> tuple:
    """(on_step, log_fn, close) of a ProgressLine on stderr; no-ops when not `enabled` (other hosts)."""
    if not enabled:
        return None, None, lambda: None
    line = ProgressLine(total, name=name)
    return line.on_step, line.on_log, line.close
