"""The reproduction experiment (iar_jax/experiment.py): table logic on hand-made curves, and a tiny
end-to-end run (2 seeds, a few steps) that writes the plot and tables and resumes without retraining."""
import json
import os

import numpy as np
import pytest

from iar_jax import experiment as E


def test_steps_to_reach_first_step_at_or_below_target():
    steps = [10, 20, 30, 40]
    assert E.steps_to_reach(steps, [9.0, 7.0, 5.0, 6.0], 7.0) == 20  # equality counts
    assert E.steps_to_reach(steps, [9.0, 7.0, 5.0, 6.0], 5.5) == 30  # first hit, not the last
    assert E.steps_to_reach(steps, [9.0, 8.0, 7.5, 7.1], 7.0) is None
    assert E.steps_to_reach([], [], 1.0) is None


def test_summarize_pairs_each_seed_with_its_baseline():
    steps = [100, 200, 300, 400]
    curves = {
        "baseline": {0: {"steps": steps, "fid": [50.0, 30.0, 22.0, 20.0]},
                     1: {"steps": steps, "fid": [60.0, 40.0, 18.0, 24.0]}},
        "iar": {0: {"steps": steps, "fid": [40.0, 20.0, 15.0, 14.0], "class_accuracy": [0.1, 0.2, 0.3, 0.5]},
                1: {"steps": steps, "fid": [45.0, 23.0, 21.0, 19.0], "class_accuracy": [0.1, 0.2, 0.3, 0.7]}},
    }  # iar reaches 20.0 (seed 0) and 24.0 (seed 1) at step 200
    rows = E.summarize(curves)
    b, i = rows["baseline"], rows["iar"]
    # Baseline seed 0 first reaches its own final 20.0 at 400; seed 1 reaches 24.0 already at 300.
    assert b["steps_to_baseline_final"]["mean"] == pytest.approx(350.0)
    assert b["steps_to_baseline_final"]["std"] == pytest.approx(np.sqrt(2 * 50.0 ** 2))  # ddof = 1
    assert i["steps_to_baseline_final"]["mean"] == pytest.approx(200.0)
    assert i["steps_to_baseline_final"]["std"] == pytest.approx(0.0)
    assert i["final_fid"]["mean"] == pytest.approx(16.5)
    assert i["final_fid"]["std"] == pytest.approx(np.sqrt(2 * 2.5 ** 2))
    assert (i["reached"], i["paired"], i["final_step"]) == (2, 2, 400)
    md = E.table_markdown(rows)
    assert i["final_class_accuracy"]["mean"] == pytest.approx(0.6)
    assert b["final_class_accuracy"] is None  # the baseline curves carry no accuracies
    assert "| iar | 2 | 200 ± 0 (2/2 seeds reached) | 16.50 ± 3.54 | 0.600 ± 0.141 | 400 |" in md


def test_summarize_not_reached_and_unpaired():
    steps = [1, 2]
    rows = E.summarize({"baseline": {0: {"steps": steps, "fid": [5.0, 3.0]}},
                        "iar": {0: {"steps": steps, "fid": [6.0, 4.0]}, 1: {"steps": steps, "fid": [2.0, 1.0]}}})
    assert rows["iar"]["reached"] == 0 and rows["iar"]["paired"] == 1  # seed 1 has no baseline yet
    assert rows["iar"]["steps_to_baseline_final"] is None
    assert "not reached" in E.table_markdown(rows)


def _tiny_config():
    from iar_jax.config_lib import load_config

    c = load_config("configs/repro_fmnist.py")
    c.dataset = "fashion_mnist_embedded"
    c.code_images = 64
    c.tokenizer.train.update(num_steps=2, global_batch=8, log_every=1, ckpt_every=2)
    c.cluster_size = 64
    c.extract_batch = 32
    c.ar.model.update(dim=32, n_layer=1, n_head=2)
    c.ar.train.update(num_steps=4, global_batch=8, log_every=2)
    c.ar.optim.warmup_steps = 0
    c.seeds = 2
    c.eval_every = 2
    c.eval_per_class = 2
    c.keep_samples = False
    return c


def _random_tokenizer(config, tok_dir):
    """Random tokenizer weights marked as the finished tokenizer stage: training one (the demo's stage,
    tested with the demo) or even compiling its init would dominate the test's time."""
    import jax
    import jax.numpy as jnp

    from iar_jax import checkpointing, pipeline
    from iar_jax.tokenizer.config import model_config_from, model_meta
    from iar_jax.tokenizer.vq_model import build_model

    cfg = model_config_from(config.tokenizer)
    size = int(config.tokenizer.data.image_size)
    shapes = jax.eval_shape(lambda: build_model(cfg).init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32), shapes)
    ckpt = checkpointing.Checkpointer(os.path.join(tok_dir, "checkpoints"), keep=1, async_save=False)
    ckpt.save(0, {"params": params}, {}, {"kind": "test_random", "model_family": "tokenizer",
                                          "model": model_meta(cfg)}, force=True)
    ckpt.close()
    pipeline.mark_done(tok_dir, {"steps": 0})


@pytest.mark.slow
def test_tiny_experiment_writes_outputs_and_resumes(tmp_path):
    from iar_jax import runtime

    runtime.enable_compilation_cache()  # as `iar-jax experiment` does: the second seed of an arm reuses compiles
    work = str(tmp_path / "exp")
    _random_tokenizer(_tiny_config(), os.path.join(work, "tokenizer"))
    report = E.run(_tiny_config(), work)
    for name in ("curves.png", "table.md", "table.json"):
        assert os.path.getsize(os.path.join(work, name)) > 0
    with open(os.path.join(work, "table.json")) as f:
        saved = json.load(f)
    assert set(saved["table"]) == {"baseline", "iar"}
    for arm in ("baseline", "iar"):
        assert saved["table"][arm]["seeds"] == [0, 1]
        for seed in ("0", "1"):
            curve = saved["curves"][arm][seed]
            assert curve["steps"] == [2, 4] and all(np.isfinite(curve["fid"]))
    # The iar row counts the seeds whose curve gets to the paired baseline's final FID (recounted here).
    curves = saved["curves"]
    hits = [any(f <= curves["baseline"][k]["fid"][-1] for f in curves["iar"][k]["fid"]) for k in ("0", "1")]
    assert saved["table"]["iar"]["paired"] == 2 and saved["table"]["iar"]["reached"] == sum(hits)
    # The cluster loss is the only difference between the arms: same seed, same init and batches.
    assert saved["curves"]["iar"]["0"]["fid"] != saved["curves"]["baseline"]["0"]["fid"]
    with open(os.path.join(work, "runs", "iar_s1", "evals.json")) as f:
        evals = json.load(f)
    # Resuming: nothing is retrained or re-evaluated, the same table comes back.
    again = E.run(_tiny_config(), work)
    with open(os.path.join(work, "runs", "iar_s1", "evals.json")) as f:
        assert json.load(f) == evals
    assert again["table"] == report["table"]
