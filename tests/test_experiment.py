"""The reproduction experiment (iar_jax/experiment.py): table logic on hand-made curves, and a tiny
end-to-end run (one regime, three arms, 2 seeds, a few steps) that writes the plot and tables and
resumes without retraining."""
import json
import math
import os

import numpy as np
import pytest

from iar_jax import experiment as E


def test_reach_step_interpolates_between_evaluated_steps():
    steps = [10, 20, 30, 40]
    fids = [9.0, 7.0, 5.0, 6.0]
    assert E.reach_step(steps, fids, 6.0) == pytest.approx(25.0)  # 20 + (7 - 6) / (7 - 5) * 10
    assert E.reach_step(steps, fids, 7.0) == pytest.approx(20.0)  # equality: exactly that step
    assert E.reach_step(steps, fids, 10.0) == 10.0  # already there at the first evaluation
    assert E.reach_step(steps, fids, 4.0) == math.inf  # never


def test_speed_ratio_uses_the_seed_mean_curves():
    steps = [1, 2, 3]
    base = np.array([[10.0, 8.0, 6.0], [12.0, 8.0, 4.0]])  # mean 11, 8, 5: target 5
    arm = np.array([[9.0, 6.0, 4.0], [9.0, 4.0, 4.0]])  # mean 9, 5, 4: reaches 5 at step 2
    assert E.speed_ratio(steps, base, arm) == pytest.approx(2 / 3)
    assert E.speed_ratio(steps, base, base) == pytest.approx(1.0)
    assert E.speed_ratio(steps, base, base + 1) == math.inf


def test_relative_change_last():
    steps = [100, 200, 300, 400, 500]
    assert E.relative_change_last(steps, [50.0, 40.0, 30.0, 20.0, 10.0]) == pytest.approx(0.5)  # 20 -> 10
    assert E.relative_change_last([10, 20], [8.0, 6.0], 0.25) == pytest.approx(1 / 7)  # FID(15) = 7


def test_bootstrap_interval():
    vals = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    point, (lo, hi) = E.bootstrap(5, lambda i: vals[i].mean(), 2000)
    assert point == 3.0 and 1.0 <= lo < 3.0 < hi <= 5.0
    # The interval of a mean of 5 values: about ±1.96 · sd / sqrt(5) (sd with ddof 0, as the bootstrap).
    half = 1.96 * vals.std() / np.sqrt(5)
    assert lo == pytest.approx(3 - half, abs=0.3) and hi == pytest.approx(3 + half, abs=0.3)
    assert E.bootstrap(4, lambda i: 7.0, 100) == (7.0, (7.0, 7.0))
    assert E.bootstrap(1, lambda i: 2.0, 100) == (2.0, (2.0, 2.0))
    # inf-safe: a statistic that is infinite for some resamples gives an infinite upper end.
    _, (lo, hi) = E.bootstrap(5, lambda i: math.inf if (i == 0).sum() >= 2 else 1.0, 500)
    assert lo == 1.0 and hi == math.inf


def test_wrong_in_right_cluster():
    cluster_of = np.array([0, 0, 1, 1])
    target = np.array([0, 0, 2, 3, 1])
    pred = np.array([0, 1, 3, 0, 2])  # wrong: 1 (same cluster), 3 (same), 0 (other), 2 (other)
    assert E.wrong_in_right_cluster(pred, target, cluster_of) == pytest.approx(0.5)
    assert math.isnan(E.wrong_in_right_cluster(target, target, cluster_of))


def test_in_batches_covers_every_row_in_order():
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return x * 2.0

    x = np.arange(14.0).reshape(7, 2)
    np.testing.assert_array_equal(np.asarray(E._in_batches(fn, 3)(x)), x * 2.0)
    assert calls == [3, 3, 1]  # a remainder slice, no padding
    assert E._in_batches(fn, 0) is fn  # 0 = one call


def test_flock_claims_and_timings_sum_over_workers(tmp_path):
    path = str(tmp_path / "run.lock")
    with E._flock(path) as held:
        assert held
        with E._flock(path, blocking=False) as other:  # a second open file: another claimant
            assert other is False
    with E._flock(path, blocking=False) as again:
        assert again  # released on exit
    with open(tmp_path / "timings.w0.json", "w") as f:
        json.dump({"stages": 2.0, "iar_s0": 5.0}, f)
    with open(tmp_path / "timings.w1.json", "w") as f:
        json.dump({"stages": 0.5, "iar_s1": 7.0}, f)
    assert E.read_timings(str(tmp_path)) == {"stages": 2.5, "iar_s0": 5.0, "iar_s1": 7.0}


def test_second_experiment_on_a_workdir_is_refused(tmp_path):
    from iar_jax import checkpointing

    with checkpointing.WorkdirLock(str(tmp_path)):
        with pytest.raises(checkpointing.WorkdirLockedError, match="is in use by process"):
            E.run(_tiny_config(), str(tmp_path))
    assert os.listdir(tmp_path) == []  # refused before any work; the holder's lock is gone with it


def test_random_mapping_is_a_seeded_permutation():
    m = E.random_mapping(64, 3)
    assert sorted(m.tolist()) == list(range(64))
    assert np.array_equal(m, E.random_mapping(64, 3)) and not np.array_equal(m, E.random_mapping(64, 4))


def test_summarize_pairs_seeds_and_computes_each_statistic():
    steps = [100, 200, 300, 400]
    curves = {
        "baseline": {0: {"steps": steps, "fid": [50.0, 30.0, 22.0, 20.0], "class_accuracy": [0.1, 0.2, 0.3, 0.4]},
                     1: {"steps": steps, "fid": [60.0, 40.0, 18.0, 24.0], "class_accuracy": [0.1, 0.2, 0.3, 0.6]}},
        "iar": {0: {"steps": steps, "fid": [40.0, 20.0, 15.0, 14.0], "class_accuracy": [0.1, 0.2, 0.3, 0.5]},
                1: {"steps": steps, "fid": [44.0, 24.0, 21.0, 20.0], "class_accuracy": [0.1, 0.2, 0.3, 0.7]},
                2: {"steps": steps, "fid": [1.0, 1.0, 1.0, 1.0], "class_accuracy": [1.0, 1.0, 1.0, 1.0]}},
    }  # seed 2 has no baseline: left out everywhere
    rob = {"baseline": {0: 0.2, 1: 0.4}, "iar": {0: 0.5, 1: 0.7, 2: 1.0}}
    rows = E.summarize(curves, rob, n_boot=200)
    b, i = rows["baseline"], rows["iar"]
    assert b["seeds"] == i["seeds"] == [0, 1]
    # Baseline mean curve 55, 35, 20, 22: its final 22 is first reached between 200 (35) and 300 (20).
    assert b["speed_ratio"]["value"] == pytest.approx((200 + (35 - 22) / (35 - 20) * 100) / 400)
    # iar mean curve 42, 22, 18, 17: reaches 22 at step 200.
    assert i["speed_ratio"]["value"] == pytest.approx(0.5)
    assert i["final_fid"]["value"] == pytest.approx(17.0)
    assert i["final_fid_minus_baseline"]["value"] == pytest.approx(-5.0)  # (14 - 20 + 20 - 24) / 2
    assert i["final_class_accuracy"]["value"] == pytest.approx(0.6)
    assert i["wrong_in_right_cluster"]["value"] == pytest.approx(0.6)
    assert b["fid_change_last_20pct"] == pytest.approx(1.6 / 20.4)  # FID(320) = 20 + 0.2 * 2
    for row in rows.values():
        for key in ("final_fid", "speed_ratio", "wrong_in_right_cluster"):
            assert row[key]["lo"] <= row[key]["value"] <= row[key]["hi"]
    md = E.table_markdown({"r": rows}, {"r": 0.25})
    assert "| iar | 2 | 0.50 [" in md and "by chance: 0.250" in md
    assert E.summarize({"baseline": {}, "iar": {0: curves["iar"][0]}}) == {}


def _tiny_config():
    from iar_jax.config_lib import load_config

    c = load_config("configs/repro_fmnist.py")
    c.dataset = "fashion_mnist_embedded"
    c.code_images = 64
    c.heldout_images = 16
    c.tokenizer.train.update(num_steps=2, global_batch=8, log_every=1, ckpt_every=2)
    c.regimes = {"tiny": {"codebook_size": 64, "cluster_size": 16}}
    c.regime_names = "tiny"
    c.extract_batch = 32
    c.ar.model.update(dim=32, n_layer=1, n_head=2)
    c.ar.train.update(num_steps=2, global_batch=8, log_every=1)
    c.ar.optim.warmup_steps = 0
    c.seeds = 2
    c.eval_every = 2
    c.eval_per_class = 2
    c.decode_batch = 8  # 20 samples: two slices and a remainder
    c.bootstrap = 50
    c.keep_samples = False
    c.parallel_regimes = False
    return c


def _random_tokenizer(tok_config, tok_dir):
    """Random tokenizer weights marked as the finished tokenizer stage: training one (the pipeline's stage,
    tested with the demo) or even compiling its init would dominate the test's time."""
    import jax
    import jax.numpy as jnp

    from iar_jax import checkpointing, pipeline
    from iar_jax.tokenizer.config import model_config_from, model_meta
    from iar_jax.tokenizer.vq_model import build_model

    cfg = model_config_from(tok_config)
    size = int(tok_config.data.image_size)
    shapes = jax.eval_shape(lambda: build_model(cfg).init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32), shapes)
    ckpt = checkpointing.Checkpointer(os.path.join(tok_dir, "checkpoints"), keep=1, async_save=False)
    ckpt.save(0, {"params": params}, {}, {"kind": "test_random", "model_family": "tokenizer",
                                          "model": model_meta(cfg)}, force=True)
    ckpt.close()
    pipeline.mark_done(tok_dir, {"steps": 0})


def test_unfinished_stage_is_a_preemption():
    from iar_jax import pipeline, runtime

    pipeline.check_finished(5, 5)
    with pytest.raises(runtime.Preempted, match="stopped at step 3 of 5"):  # the CLI exits 143, not 0 or 1
        pipeline.check_finished(3, 5)


def test_regime_config_errors():
    c = _tiny_config()
    c.regimes.tiny.cluster_size = 5
    with pytest.raises(ValueError, match="cluster_size 5 must be >= 2 and divide codebook_size 64"):
        E.regime_configs(c)
    c.regime_names = "nope"
    with pytest.raises(ValueError, match="unknown regime 'nope'"):
        E.regime_configs(c)


@pytest.mark.slow
def test_tiny_experiment_writes_outputs_and_resumes(tmp_path):
    from iar_jax import runtime

    runtime.enable_compilation_cache()  # as `iar-jax experiment` does: later runs reuse compiles
    work = str(tmp_path / "exp")
    tok_cfg, _ = E.regime_configs(_tiny_config())["tiny"]
    _random_tokenizer(tok_cfg, os.path.join(work, "tiny", "tokenizer"))
    # Another worker holds the claim on random seed 1: this run leaves it alone and does the rest.
    os.makedirs(os.path.join(work, "tiny", "runs"))
    with E._flock(os.path.join(work, "tiny", "runs", "random_s1.lock")):
        with pytest.raises(ValueError, match="unfinished: tiny/random_s1 were held by another process"):
            E.run(_tiny_config(), work)  # not a success exit
    assert not os.path.exists(os.path.join(work, "train.lock"))  # the experiment's lock is released
    with open(os.path.join(work, "table.json")) as f:
        first = json.load(f)  # the partial report is still written
    assert not os.path.exists(os.path.join(work, "tiny", "runs", "random_s1"))
    with open(os.path.join(work, "tiny", "runs", "iar_s1", "evals.json")) as f:
        evals = json.load(f)
    # Resuming, through a worker process this time: only the unclaimed run trains; nothing else is
    # retrained or re-evaluated.
    c = _tiny_config()
    c.parallel_regimes = True
    assert not os.path.exists(os.path.join(work, "worker0.log"))
    report = E.run(c, work)
    assert os.path.getsize(os.path.join(work, "worker0.log")) > 0  # the worker process's log
    with open(os.path.join(work, "tiny", "runs", "iar_s1", "evals.json")) as f:
        assert json.load(f) == evals
    assert set(first["curves"]["tiny"]["random"]) == {"0"}  # only finished runs; pairing keeps seed 0 alone
    for arm in ("baseline", "iar"):
        assert report["curves"]["tiny"][arm] == first["curves"]["tiny"][arm]
    assert set(report["timings"]["tiny"]) >= {"stages", "baseline_s0", "random_s1"}
    for name in ("curves.png", "table.md", "table.json"):
        assert os.path.getsize(os.path.join(work, name)) > 0
    with open(os.path.join(work, "table.json")) as f:
        saved = json.load(f)
    rows, curves = saved["tables"]["tiny"], saved["curves"]["tiny"]
    assert set(rows) == {"baseline", "iar", "random"}
    assert saved["chance"]["tiny"] == pytest.approx(15 / 63)
    for arm in rows:
        assert rows[arm]["seeds"] == [0, 1]
        for seed in ("0", "1"):
            c = curves[arm][seed]
            assert c["steps"] == [2] and all(np.isfinite(c["fid"])) and 0.0 <= c["robustness"] <= 1.0
    # The speed ratio recomputed from the saved curves with the formula: arm mean curve vs baseline's.
    fid = {a: np.array([curves[a][s]["fid"] for s in ("0", "1")]) for a in rows}
    want = E.reach_step([2], fid["iar"].mean(0), fid["baseline"].mean(0)[-1]) / 2
    assert rows["iar"]["speed_ratio"]["value"] == pytest.approx(want)
    # The random arm trains with a different random permutation per seed; the others with k-means.
    maps = [np.load(os.path.join(work, "tiny", "random_mappings", f"s{s}.npy")) for s in (0, 1)]
    assert all(sorted(m.tolist()) == list(range(64)) for m in maps) and not np.array_equal(*maps)
    # The loss (and for random, the clusters) is the only difference between arms of a seed.
    assert len({tuple(curves[a]["0"]["fid"]) for a in rows}) == 3
