"""Multi-process training and kill-and-resume, in subprocesses (real process boundaries)."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # several multi-process trainings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _env(devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def _worker(args, devices):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "_train_worker.py")] + [str(a) for a in args],
                            cwd=REPO, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(p, timeout=900):
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _params(path):
    with np.load(path) as z:
        return [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]


def test_two_processes_match_one_process(tmp_path):
    port = _free_port()
    single = _worker([tmp_path / "one", 3, tmp_path / "one.json"], 8)
    pair = [_worker([tmp_path / "two", 3, tmp_path / "two.json", i, 2, port], 4) for i in range(2)]
    for p in [single] + pair:
        _finish(p)
    one, two = json.load(open(tmp_path / "one.json")), json.load(open(tmp_path / "two.json"))
    assert (one["processes"], one["devices"], two["processes"], two["devices"]) == (1, 8, 2, 8)
    for a, b in zip(_params(tmp_path / "one.json.npz"), _params(tmp_path / "two.json.npz")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    steps = 12
    reference = _worker([tmp_path / "ref", steps, tmp_path / "ref.json"], 1)
    kill_after = random.randrange(2, steps - 1, 2)  # a checkpoint step the victim must pass first
    print("killing after checkpoint", kill_after)
    victim = _worker([tmp_path / "victim", steps, tmp_path / "victim.json"], 1)
    ckdir = tmp_path / "victim" / "checkpoints"
    deadline = time.time() + 900
    while time.time() < deadline and victim.poll() is None:
        done = [int(d) for d in os.listdir(ckdir) if d.isdigit()] if ckdir.exists() else []
        if done and max(done) >= kill_after:
            break
        time.sleep(0.05)
    assert victim.poll() is None, "training finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "victim.json").exists()
    _finish(_worker([tmp_path / "victim", steps, tmp_path / "victim.json"], 1))
    _finish(reference)
    for a, b in zip(_params(tmp_path / "ref.json.npz"), _params(tmp_path / "victim.json.npz")):
        np.testing.assert_array_equal(a, b)
