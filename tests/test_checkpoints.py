"""Checkpoints a user can trust: incompatible vs corrupt, quarantine, no silent restart, one writer
per workdir, SIGTERM exit code, params-only restore onto another mesh, old layout.

One 6-step FSDP run over 8 devices (checkpoints 2, 4, 6) is trained once; each test mutates a
copy and checks that every checkpoint that must survive is byte-identical afterwards.
"""
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_iar_config
from iar_jax import checkpointing, sharding, trainer as trainer_lib

FSDP = {"mesh.data": 1, "mesh.fsdp": 8}


def _config(**kw):
    base = {"train.global_batch": 8, "train.num_steps": 6, "train.ckpt_every": 2, "train.log_every": 1,
            "data.synthetic_size": 64, **FSDP}
    base.update(kw)
    return tiny_iar_config(**base)


def _tree_bytes(path):
    """{relative file: sha1} of everything under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def _truncate(step_dir, item=None):
    """Cuts every array data file of a step (or of one of its items) to 16 bytes."""
    n = 0
    for root, _, files in os.walk(os.path.join(step_dir, item) if item else step_dir):
        for f in files:
            p = os.path.join(root, f)
            if "/d/" in p or "ocdbt.process" in p:  # tensorstore data files, not metadata
                with open(p, "r+b") as fh:
                    fh.truncate(16)
                n += 1
    assert n, f"no data files under {step_dir}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("trained"))
    _, state = trainer_lib.train_and_evaluate(_config(), wd)
    return wd, jax.device_get(state)


@pytest.fixture
def workdir(trained, tmp_path):
    wd = str(tmp_path / "wd")
    shutil.copytree(trained[0], wd)
    return wd


def _ck(wd):
    return os.path.join(wd, "checkpoints")


def test_layout_has_separate_items(trained):
    names = sorted(os.listdir(os.path.join(_ck(trained[0]), "6")))
    assert {"params", "opt", "data", "meta"} <= set(names) and "state" not in names and "ema_params" not in names
    assert checkpointing.Checkpointer(_ck(trained[0]), read_only=True).all_steps() == [2, 4, 6]


def test_config_change_is_incompatible_and_touches_nothing(workdir, trained):
    before = _tree_bytes(workdir)
    with pytest.raises(checkpointing.IncompatibleCheckpointError,
                       match=r"/6 does not match .*ema_params \(only in this run\).*restore=params_only"):
        trainer_lib.train_and_evaluate(_config(**{"train.ema_decay": 0.999, "train.num_steps": 9}), workdir)
    assert _tree_bytes(workdir) == before  # no step deleted or added, no lock left behind
    # params_only keeps params and step, re-initialises the optimizer and starts the EMA at the params.
    _, state = trainer_lib.train_and_evaluate(
        _config(**{"train.ema_decay": 0.999, "train.restore": "params_only"}), workdir)
    want = trained[1]["params"]
    assert int(state["step"]) == 6
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state["params"]), want)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state["ema_params"]), want)
    mu = jax.device_get(state["opt_state"][1][0].mu)
    assert all(not np.any(x) for x in jax.tree_util.tree_leaves(mu))
    assert _tree_bytes(_ck(workdir)) == {k[len("checkpoints/"):]: v for k, v in before.items()
                                         if k.startswith("checkpoints/")}  # nothing trained, nothing saved


def test_corrupt_newest_step_is_moved_aside_and_saved_again(workdir, trained, caplog):
    ck = _ck(workdir)
    _truncate(os.path.join(ck, "6"), "params")
    old6, keep = _tree_bytes(os.path.join(ck, "6")), {s: _tree_bytes(os.path.join(ck, s)) for s in ("2", "4")}
    _, state = trainer_lib.train_and_evaluate(_config(), workdir)
    assert "moved it to 6.corrupt" in caplog.text
    assert _tree_bytes(os.path.join(ck, "6.corrupt")) == old6
    assert {s: _tree_bytes(os.path.join(ck, s)) for s in ("2", "4")} == keep
    assert checkpointing.Checkpointer(ck, read_only=True).all_steps() == [2, 4, 6]
    # Retrained from 4: the re-saved 6 is bit-identical to the uninterrupted run's.
    params, meta = checkpointing.load_params(workdir)
    assert meta["step"] == 6
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, trained[1]["params"])
    # Going on, rotation keeps 3 readable steps; the quarantined one never counts nor goes.
    trainer_lib.train_and_evaluate(_config(**{"train.num_steps": 8}), workdir)
    assert checkpointing.Checkpointer(ck, read_only=True).all_steps() == [4, 6, 8]
    assert _tree_bytes(os.path.join(ck, "6.corrupt")) == old6


def test_no_readable_checkpoint_stops_unless_start_over(workdir):
    ck = _ck(workdir)
    for s in ("2", "4", "6"):
        _truncate(os.path.join(ck, s), "opt")
    before = {s: _tree_bytes(os.path.join(ck, s)) for s in ("2", "4", "6")}
    for _ in range(2):  # the second run finds only the quarantined steps: still an error
        with pytest.raises(checkpointing.NoReadableCheckpointError,
                           match=r"no readable checkpoint .*2.corrupt, 4.corrupt, 6.corrupt.*restore=start_over"):
            trainer_lib.train_and_evaluate(_config(), workdir)
    assert {s: _tree_bytes(os.path.join(ck, s + ".corrupt")) for s in before} == before
    _, state = trainer_lib.train_and_evaluate(_config(**{"train.restore": "start_over", "train.num_steps": 2}),
                                              workdir)
    assert int(state["step"]) == 2
    assert {s: _tree_bytes(os.path.join(ck, s + ".corrupt")) for s in before} == before


def _mesh_shardings(n_devices):
    from iar_jax.models.families import get_family
    from iar_jax.sampling.generate import model_param_shardings

    cfg = _config(**{"mesh.data": n_devices, "mesh.fsdp": 1})
    family = get_family(cfg.model_family)
    module, _ = family.build(cfg)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:n_devices])
    return model_param_shardings(cfg, family, module, mesh)


@pytest.mark.parametrize("n_devices", [1, 4])
def test_params_restore_onto_another_mesh_reads_only_params(workdir, trained, n_devices):
    _truncate(os.path.join(_ck(workdir), "6"), "opt")  # a full-state restore would fail here
    shardings = _mesh_shardings(n_devices)
    params, meta = checkpointing.load_params(workdir, shardings=shardings, slice_bytes=1)  # one chunk at a time
    assert meta["step"] == 6
    for got, s, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(shardings),
                            jax.tree_util.tree_leaves(trained[1]["params"])):
        assert got.sharding == s and len(got.sharding.device_set) == n_devices
        np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(checkpointing.CheckpointKindError, match="has no ema_params"):
        checkpointing.load_params(workdir, ema=True)


def test_pieces_cover_the_box_in_whole_chunks():
    # rows 10..20 of 8-row chunks: cut at the chunk boundary 16; 4-byte items, 24 per row.
    assert checkpointing._pieces([(10, 20), (0, 24)], [8, 24], 4, 1) == [[(10, 16), (0, 24)], [(16, 20), (0, 24)]]
    # 16 rows' worth of bytes: two chunks a piece.
    assert checkpointing._pieces([(0, 40), (0, 24)], [8, 24], 4, 16 * 96) == [
        [(0, 16), (0, 24)], [(16, 32), (0, 24)], [(32, 40), (0, 24)]]
    # axis 0 inside one chunk: cut along axis 1 instead; a box inside one chunk stays whole.
    assert checkpointing._pieces([(0, 4), (0, 24)], [8, 12], 4, 1) == [[(0, 4), (0, 12)], [(0, 4), (12, 24)]]
    assert checkpointing._pieces([(2, 6), (0, 24)], [8, 24], 4, 1) == [[(2, 6), (0, 24)]]


@pytest.mark.parametrize("n_devices", [1, 4])
def test_sliced_read_is_bit_identical(tmp_path, monkeypatch, n_devices):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    rng = np.random.default_rng(0)
    w = rng.standard_normal((60, 24)).astype(np.float32)
    w.flat[:4] = [np.nan, -0.0, np.inf, np.finfo(np.float32).tiny / 2]  # bits a value compare could miss
    want = {"w": w, "b": rng.integers(-2**31, 2**31 - 1, (7,), dtype=np.int32)}
    six = Mesh(np.array(jax.devices()[:6]), ("x",))  # saved in 10-row chunks (its shards)
    saved = {"w": jax.device_put(w, NamedSharding(six, P("x"))), "b": want["b"]}
    path = tmp_path / "item"
    with ocp.StandardCheckpointer() as c:
        c.save(path, saved)
    md = ocp.PyTreeCheckpointHandler().metadata(path)
    assert md.tree["w"].storage.chunk_shape == (10, 24)
    counts = []
    real = checkpointing._pieces
    monkeypatch.setattr(checkpointing, "_pieces", lambda *a: counts.append(len(real(*a))) or real(*a))
    mesh = Mesh(np.array(jax.devices()[:n_devices]).reshape(-1, 2 if n_devices == 4 else 1), ("a", "b"))
    # 4 devices: 15-row shards across 10-row chunks, column shards, 2-D shards, replicated.
    specs = [P(("a", "b")), P(None, ("a", "b")), P("a", "b"), P()] if n_devices == 4 else [P()]
    for spec in specs:
        shardings = {"w": NamedSharding(mesh, spec), "b": NamedSharding(mesh, P())}
        got = checkpointing.read_arrays(path, md.use_zarr3, md.tree, shardings, slice_bytes=10 * 24 * 4)
        assert got["w"].sharding == shardings["w"] and len(got["w"].sharding.device_set) == n_devices
        for k, bits in (("w", np.uint32), ("b", np.int32)):
            np.testing.assert_array_equal(np.asarray(got[k]).view(bits), want[k].view(bits))
    # Pieces per distinct shard ("b" first: one chunk), worked out by hand from the boxes above.
    assert counts == ([1, 6] if n_devices == 1 else [1, 2, 2, 2, 2] * 3 + [1, 6])


def test_old_single_item_layout_still_loads(trained, tmp_path):
    wd, state = trained
    ck_dir = str(tmp_path / "old" / "checkpoints")
    old = ocp.CheckpointManager(ck_dir, options=ocp.CheckpointManagerOptions(create=True), item_names=(
        "state", "data", "meta"))
    meta = checkpointing.Checkpointer(_ck(wd), read_only=True).read_meta(6)
    old.save(6, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"step": 6}),
                                        meta=ocp.args.JsonSave(meta)))
    old.close()
    params, got_meta = checkpointing.load_params(str(tmp_path / "old"), shardings=_mesh_shardings(1))
    assert got_meta["step"] == 6
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, state["params"])
    tr = trainer_lib.Trainer(_config(), jax.devices())
    restored = checkpointing.Checkpointer(ck_dir).restore_latest(tr.abstract_sharded_state())
    assert restored[3] == 6 and restored[1] == {"step": 6}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           jax.device_get(restored[0]), state)


# ----------------------------------------------------------------------------------------------
# One writer per workdir


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_workdir_lock(tmp_path, caplog):
    wd = str(tmp_path)
    with checkpointing.WorkdirLock(wd):
        t0 = time.time()
        with pytest.raises(checkpointing.WorkdirLockedError,
                           match=f"in use by process {os.getpid()} on host {socket.gethostname()}"):
            trainer_lib.train_and_evaluate(_config(), wd)
        assert time.time() - t0 < 10
    assert not os.path.exists(os.path.join(wd, "train.lock"))  # released
    lock = os.path.join(wd, "train.lock")
    with open(lock, "w") as f:  # a crashed run on this host: taken over
        f.write(f'{{"host": "{socket.gethostname()}", "pid": {_dead_pid()}, "token": "x", "since": "then"}}')
    with checkpointing.WorkdirLock(wd):
        assert "taking over the stale lock" in caplog.text
        with open(lock) as f:
            assert f'"pid": {os.getpid()}' in f.read()
    with open(lock, "w") as f:  # another host: cannot tell whether it runs, so refused
        f.write('{"host": "elsewhere", "pid": 1, "token": "x", "since": "then"}')
    with pytest.raises(checkpointing.WorkdirLockedError, match="process 1 on host elsewhere"):
        with checkpointing.WorkdirLock(wd):
            pass
    assert os.path.exists(lock)  # someone else's lock is never removed


@pytest.mark.slow  # three CLI trainings in subprocesses
def test_cli_second_trainer_refused_sigterm_exits_143_then_resumes(tmp_path, repo_root):
    wd = str(tmp_path / "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               IAR_JAX_HUGE_PAGES="0", PYTHONPATH=repo_root)

    def cli(steps):
        return subprocess.Popen(
            [sys.executable, "-m", "iar_jax.cli", "train", "--config=configs/iar.py:tiny", f"--workdir={wd}",
             f"--config.train.num_steps={steps}", "--config.train.global_batch=8", "--config.train.ckpt_every=2",
             "--config.train.log_every=1", "--config.data.synthetic_size=64"],
            cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = cli(100000)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None and not os.path.isdir(os.path.join(_ck(wd), "2")):
        time.sleep(0.1)
    assert first.poll() is None, first.communicate()[0][-3000:]
    t0 = time.time()
    second = cli(10)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 1 and time.time() - t0 < 120, out[-3000:]
    assert f"in use by process {first.pid} on host {socket.gethostname()}" in out.strip().splitlines()[-1]
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 143, out[-3000:]
    steps = checkpointing.Checkpointer(_ck(wd), read_only=True).all_steps()
    last = steps[-1]
    assert f"stopped by SIGTERM at step {last} after saving it" in out
    assert not os.path.exists(os.path.join(wd, "train.lock"))
    done = cli(last + 1)
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0, out[-3000:]
    assert checkpointing.Checkpointer(_ck(wd), read_only=True).all_steps()[-1] == last + 1
