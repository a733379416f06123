"""Shared trainer: sharding invariance, micro-batches, overfitting, resume, errors."""
import os

import jax
import numpy as np
import pytest

from conftest import tiny_iar_config
from iar_jax import checkpointing, runtime, trainer as trainer_lib
from iar_jax.data import codes as codes_lib


def _config(**kw):
    base = {"train.global_batch": 8, "model.token_dropout": 0.1}
    base.update(kw)
    return tiny_iar_config(**base)


def _batches(cfg, n, seed=0):
    rng = np.random.default_rng(seed)
    t = cfg.model.grid_size ** 2
    return [{"codes": rng.integers(0, cfg.model.vocab_size, (cfg.train.global_batch, t)).astype(np.int32),
             "labels": rng.integers(0, cfg.model.num_classes, (cfg.train.global_batch,)).astype(np.int32)}
            for _ in range(n)]


def _run(cfg, devices, batches):
    tr = trainer_lib.Trainer(cfg, devices)
    state = tr.init_state(0)
    losses = []
    for b in batches:
        state, m = tr.step(state, tr.put_batch(b))
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state["params"])


@pytest.fixture(scope="module")
def one_device_run():
    cfg = _config()
    return _run(cfg, jax.devices()[:1], _batches(cfg, 3))


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=4, tensor=1), dict(data=2, fsdp=1, tensor=4)])
def test_sharded_training_matches_one_device(one_device_run, mesh):
    assert jax.device_count() == 8
    cfg = _config(**{f"mesh.{k}": v for k, v in mesh.items()})
    losses, params = _run(cfg, jax.devices(), _batches(cfg, 3))
    np.testing.assert_allclose(losses, one_device_run[0], rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params, one_device_run[1])


def test_micro_batches_equal_full_batch():
    # Without dropout the mean of 4 micro-batch gradients is the full-batch gradient.
    off = {"model.token_dropout": 0.0, "model.resid_dropout": 0.0, "model.ffn_dropout": 0.0, "model.class_dropout": 0.0}
    cfg1 = _config(**off)
    cfg4 = _config(**off, **{"train.micro_batches": 4})
    batches = _batches(cfg1, 2)
    dev = jax.devices()[:1]
    l1, p1 = _run(cfg1, dev, batches)
    l4, p4 = _run(cfg4, dev, batches)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p4)


def test_tiny_model_overfits_tiny_batch():
    cfg = _config(**{"optim.lr": 3e-3, "optim.weight_decay": 0.0, "model.token_dropout": 0.0,
                     "model.resid_dropout": 0.0, "model.ffn_dropout": 0.0, "model.class_dropout": 0.0})
    batch = _batches(cfg, 1)[0]
    losses, _ = _run(cfg, jax.devices()[:1], [batch] * 60)
    # Start near log(V) = log 256 ≈ 5.5 (+ cluster CE ≈ log 16); memorised to a small fraction.
    assert losses[0] > 7.0
    assert losses[-1] < 0.1 * losses[0]


def test_weight_decay_only_on_matrices():
    cfg = _config()
    tr = trainer_lib.Trainer(cfg, jax.devices()[:1])

    boxed = jax.eval_shape(lambda r: tr.family.init(tr.module, r, tr._dummy), jax.random.PRNGKey(0))["params"]
    mask = trainer_lib.decay_mask(boxed)
    block = mask["transformer"]["layers"]["block"]
    # Stacked by nn.scan, norm weights are [n_layer, dim] but 1-D in the reference: no decay.
    assert block["attention_norm"]["weight"] is False and block["feed_forward"]["w1"]["kernel"] is True
    assert mask["tok_embeddings"]["embedding"] is True and mask["transformer"]["norm"]["weight"] is False


def _tiny_run_config(tmp_steps=6, **kw):
    base = {"train.num_steps": tmp_steps, "train.ckpt_every": 2, "train.log_every": 1, "data.synthetic_size": 64}
    base.update(kw)
    return _config(**base)


def test_injected_nan_stops_and_keeps_last_checkpoint(tmp_path):
    from iar_jax.models import families

    cfg = _tiny_run_config(6)
    base = families.get_family("iar")

    def make_loss(module, config):
        inner = base.make_loss(module, config)

        def loss_fn(params, batch, rng, train):
            loss, m = inner(params, batch, rng, train)
            poisoned = jax.numpy.any(batch["labels"] == 9)  # label 9 appears only in the poisoned step
            loss = jax.numpy.where(poisoned, jax.numpy.nan, loss)
            return loss, dict(m, loss=loss)

        return loss_fn

    families.register(families.Family("iar_nan_test", base.build, base.batch_spec, make_loss, base.check_batch, base.init))
    cfg.model_family = "iar_nan_test"
    src = codes_lib.synthetic_source({"codes": ((16,), np.int32), "labels": ((), np.int32)}, 64, 0, 256, 9)
    it = codes_lib.BatchIterator(src, cfg.train.global_batch, cfg.train.seed)
    poison_idx, _ = it.indices(4)  # the 5th step (step number 5) sees label 9
    src.arrays["labels"][poison_idx[0]] = 9
    with pytest.raises(runtime.NonFiniteLossError, match="non-finite loss .* at step 5.*last good checkpoint: step 4"):
        trainer_lib.train_and_evaluate(cfg, str(tmp_path), source=src, devices=jax.devices()[:1])
    assert checkpointing.Checkpointer(os.path.join(tmp_path, "checkpoints")).all_steps() == [2, 4]


def test_checkpoint_of_another_model_kind_is_refused(tmp_path):
    cfg = _tiny_run_config(2)
    trainer_lib.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1])
    other = _tiny_run_config(4, **{"model.vocab_size": 128})
    with pytest.raises(checkpointing.CheckpointKindError, match="different model settings \\(vocab_size\\)"):
        trainer_lib.train_and_evaluate(other, str(tmp_path), devices=jax.devices()[:1])


@pytest.mark.parametrize("overrides,match", [
    ({"loss.cluster_size": 24}, "vocab_size 256 is not divisible by loss.cluster_size 24"),
    ({"mesh.data": 3}, "does not match the 8 devices"),
    ({"train.global_batch": 12}, "global batch 12 is not divisible by data-parallel size 8"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        trainer_lib.Trainer(_config(**overrides), jax.devices())


def test_bad_batches_and_mapping(tmp_path):
    cfg = _config()
    tr = trainer_lib.Trainer(cfg, jax.devices()[:1])
    b = _batches(cfg, 1)[0]
    with pytest.raises(ValueError, match="class label id 10 is outside \\[0, 10\\)"):
        tr.put_batch(dict(b, labels=np.full_like(b["labels"], 10)))
    with pytest.raises(ValueError, match="code id 256 is outside \\[0, 256\\)"):
        tr.put_batch(dict(b, codes=np.full_like(b["codes"], 256)))
    with pytest.raises(ValueError, match="'detail_codes' \\(dual IAR2 codes\\)"):
        tr.put_batch(dict(b, detail_codes=b["codes"]))
    bad = tmp_path / "mapping.npy"
    np.save(bad, np.zeros(256, np.int64))
    with pytest.raises(ValueError, match="not a permutation"):
        trainer_lib.Trainer(_config(**{"loss.mapping_file": str(bad)}), jax.devices()[:1])
    np.save(bad, np.arange(255))
    with pytest.raises(ValueError, match="shape \\(255,\\), expected \\(256,\\)"):
        trainer_lib.Trainer(_config(**{"loss.mapping_file": str(bad)}), jax.devices()[:1])


def test_mapping_is_applied_to_codes(tmp_path):
    from iar_jax.models import families

    cfg = _config(**{"model.token_dropout": 0.0, "model.resid_dropout": 0.0, "model.ffn_dropout": 0.0,
                     "model.class_dropout": 0.0})
    perm = np.random.default_rng(3).permutation(256)
    np.save(tmp_path / "m.npy", perm)
    fam = families.get_family("iar")
    module, _ = fam.build(cfg)
    b = _batches(cfg, 1)[0]
    params = jax.tree_util.tree_map(lambda s: 0.05 * np.random.default_rng(0).normal(size=s.shape).astype(np.float32),
                                    jax.eval_shape(lambda: fam.init(module, jax.random.PRNGKey(0), b)["params"]))
    import flax.linen as nn

    params = nn.unbox(params)
    plain = fam.make_loss(module, cfg)
    cfg_m = _config(**{"model.token_dropout": 0.0, "model.resid_dropout": 0.0, "model.ffn_dropout": 0.0,
                       "model.class_dropout": 0.0, "loss.mapping_file": str(tmp_path / "m.npy")})
    mapped = fam.make_loss(module, cfg_m)
    key = jax.random.PRNGKey(0)
    l_mapped, _ = mapped(params, b, key, False)
    l_pre, _ = plain(params, dict(b, codes=perm[b["codes"]].astype(np.int32)), key, False)
    assert float(l_mapped) == pytest.approx(float(l_pre), rel=1e-6)
