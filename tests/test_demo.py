"""`iar-jax demo --preset=smoke` end to end (a few steps per stage): outputs, metrics, resuming.

One smoke run (module fixture) is checked, rerun (every stage skipped, nothing rewritten), then
interrupted in two ways: the last stage's marker deleted (only it reruns, same numbers) and the
model's last checkpoint + marker deleted as a kill after step 2 would leave them (training
continues from step 2 and ends with the same parameters, bit for bit).
"""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # several demo runs in subprocesses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("tokenizer", "rearrange", "codes", "model", "samples", "evaluate")
REWRITTEN = ("metrics.json", "summary.txt")  # rewritten by every run (they hold this run's timing)


def run_demo(workdir, *extra):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device, as a user's laptop
    p = subprocess.run([sys.executable, "-m", "iar_jax.cli", "demo", "--preset=smoke", f"--workdir={workdir}",
                        "--noprogress", *extra], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def mtimes(workdir, skip=()):
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), workdir)
            if rel not in REWRITTEN and not rel.startswith(tuple(skip)):
                out[rel] = os.stat(os.path.join(root, f)).st_mtime_ns
    return out


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("demo") / "iar")
    p = run_demo(wd)
    assert "done already" not in p.stdout
    return wd


def test_outputs_and_metrics(workdir):
    for f in ("grid.png", "metrics.json", "summary.txt", "demo_config.json"):
        assert os.path.isfile(os.path.join(workdir, f)), f
    for stage in STAGES:
        assert os.path.isfile(os.path.join(workdir, stage, "done.json")), stage
    m = metrics(workdir)
    assert m["variant"] == "iar" and m["preset"] == "smoke"
    assert math.isfinite(m["fid"]) and m["fid"] > 0
    assert math.isfinite(m["fid_real_train"]) and m["fid_real_train"] > 0
    assert 0.0 <= m["class_accuracy"] <= 1.0
    assert m["num_samples"] == 20 and m["model_steps"] == 4
    # 2 samples of each of the 10 classes, class-major; the grid has one row per class at 2x.
    with np.load(os.path.join(workdir, "samples", "samples.npz")) as z:
        assert z["arr_0"].shape == (20, 28, 28, 3) and z["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(z["labels"], np.repeat(np.arange(10), 2))
        samples = z["arr_0"]
    from PIL import Image

    # A label column, then each class's 2 samples at 2x; every row's label column holds text.
    grid = np.asarray(Image.open(os.path.join(workdir, "grid.png")).convert("RGB"))
    label_w = grid.shape[1] - 2 * 56
    assert grid.shape[0] == 10 * 56 and label_w > 0
    for c in range(10):
        assert grid[c * 56:(c + 1) * 56, :label_w].max() > 128, f"row {c} has no class name"
        for q in range(2):
            tile = samples[2 * c + q].repeat(2, 0).repeat(2, 1)
            np.testing.assert_array_equal(grid[c * 56:(c + 1) * 56, label_w + q * 56:label_w + (q + 1) * 56], tile)
    # The recorded settings are those that ran: the model read this workdir's codes and mapping.
    with open(os.path.join(workdir, "demo_config.json")) as f:
        recorded = json.load(f)
    assert recorded == m["config"]
    data, loss = recorded["model"]["data"], recorded["model"]["loss"]
    assert (data["source"], data["path"], data["tokenizer"]) == (
        "records", os.path.join(workdir, "codes"), os.path.join(workdir, "tokenizer"))
    assert loss["mapping_file"] == os.path.join(workdir, "rearrange", "mapping.npy") and loss["cluster_size"] == 16
    # IAR trains on the rearranged ids: the mapping is a permutation of the 512 codes.
    mapping = np.load(os.path.join(workdir, "rearrange", "mapping.npy"))
    np.testing.assert_array_equal(np.sort(mapping), np.arange(512))
    with open(os.path.join(workdir, "summary.txt")) as f:
        assert "class accuracy" in f.read()


def test_second_run_skips_every_stage(workdir):
    before, m0 = mtimes(workdir), metrics(workdir)
    p = run_demo(workdir)
    assert "done already: " + ", ".join(STAGES) in p.stdout
    assert mtimes(workdir) == before  # nothing retrained, re-extracted or resampled
    m1 = metrics(workdir)
    assert (m1["fid"], m1["class_accuracy"], m1["skipped_stages"]) == (m0["fid"], m0["class_accuracy"], list(STAGES))


def test_deleted_last_marker_reruns_only_that_stage(workdir):
    m0 = metrics(workdir)
    os.remove(os.path.join(workdir, "evaluate", "done.json"))
    before = mtimes(workdir, skip=("evaluate",))
    p = run_demo(workdir)
    assert "done already: " + ", ".join(STAGES[:-1]) + "\n" in p.stdout
    assert mtimes(workdir, skip=("evaluate",)) == before
    assert os.path.isfile(os.path.join(workdir, "evaluate", "done.json"))
    assert metrics(workdir)["fid"] == m0["fid"]  # same samples, same reference: the same number


def test_interrupted_training_continues_from_its_checkpoint(workdir):
    from iar_jax import checkpointing

    ck = os.path.join(workdir, "model", "checkpoints")
    assert sorted(int(s) for s in os.listdir(ck) if s.isdigit()) == [2, 4]
    want, _ = checkpointing.load_params(os.path.join(workdir, "model"))
    # What a kill between the step-2 checkpoint and the end leaves behind.
    shutil.rmtree(os.path.join(ck, "4"))
    os.remove(os.path.join(workdir, "model", "done.json"))
    upstream = mtimes(workdir, skip=("model", "samples", "evaluate", "grid.png"))
    p = run_demo(workdir, "--verbose")
    assert "done already: tokenizer, rearrange, codes\n" in p.stdout
    assert "resumed from step 2" in p.stderr
    assert mtimes(workdir, skip=("model", "samples", "evaluate", "grid.png")) == upstream
    got, _ = checkpointing.load_params(os.path.join(workdir, "model"))
    for a, b in zip(*(__import__("jax").tree_util.tree_leaves(t) for t in (want, got))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(os.path.isfile(os.path.join(workdir, s, "done.json")) for s in STAGES)


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, "-m", "iar_jax.cli", *args], env=env, capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    assert p.returncode == 0, (args[0], p.stdout[-2000:] + p.stderr[-4000:])
    return p


def test_train_sample_evaluate_on_the_demo_outputs(workdir, tmp_path):
    """README "Train on your own codes": the CLI from the demo's codes to class accuracy. The labels
    `sample` writes are the ones `evaluate` scores (settings as the smoke demo, so compiles are shared)."""
    from iar_jax.evaluation import small_cnn

    cfg = "--config=configs/iar.py:tiny,grid=7,vocab=512,cluster=16"
    tok, mapping = os.path.join(workdir, "tokenizer"), os.path.join(workdir, "rearrange", "mapping.npy")
    model, samples, report = tmp_path / "model", tmp_path / "samples", tmp_path / "report.json"
    p = run_cli("train", cfg, f"--workdir={model}", "--config.data.source=records",
                f"--config.data.path={os.path.join(workdir, 'codes')}", f"--config.data.tokenizer={tok}",
                f"--config.loss.mapping_file={mapping}", "--config.train.num_steps=2", "--config.train.global_batch=8",
                "--config.train.log_every=2", "--config.optim.lr=1e-3", "--config.optim.warmup_steps=0",
                "--config.data.num_workers=0")
    assert "trained to step 2" in p.stdout and "step 2/2" in p.stderr
    assert json.load(open(model / "config.json"))["loss"]["mapping_file"] == mapping
    run_cli("sample", cfg, f"--workdir={model}", f"--tokenizer={tok}", f"--mapping_file={mapping}", "--per_class=2",
            "--global_batch=20", f"--out={samples}")
    run_cli("evaluate", "--feature=small_cnn", f"--samples={samples / 'samples.npz'}",
            "--ref=fashion_mnist_embedded:test", f"--out={report}", "--noprogress")
    r = json.load(open(report))
    with np.load(samples / "samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 2))
    pred = small_cnn.predict(small_cnn.load_params(), images)["logits"].argmax(-1)
    assert r["class_accuracy"] == pytest.approx(float(np.mean(pred == labels)))
    assert r["num_samples"] == 20 and r["num_ref_images"] == 1000 and math.isfinite(r["fid"])
