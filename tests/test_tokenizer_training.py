"""Tokenizer training: IAR2 stage schedule (optax gating), GAN pieces, resume, NaN guard, CLI errors."""
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

from iar_jax.config_lib import load_config
from iar_jax.tokenizer import VQConfig
from iar_jax.tokenizer import discriminator as D
from iar_jax.tokenizer.config import LossConfig, RecipeConfig
from iar_jax.tokenizer.training import TokenizerTrainer, gated, semantic_iteration, torch_clip, train_and_evaluate

DUAL = VQConfig(codebook_size=24, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=16, ch=8,
                num_res_blocks=1, norm_groups=4, dual=True, semantic_codebook_size=16)


def test_gated_adam_only_moves_on_active_steps():
    tx = gated(optax.adam(0.1), lambda c: c % 3 == 2)
    p = {"w": jnp.ones(3)}
    s = tx.init(p)
    history = []
    for _ in range(7):
        u, s = tx.update({"w": jnp.ones(3)}, s, p)
        p = optax.apply_updates(p, u)
        history.append(float(p["w"][0]))
    moved = [history[i] != (history[i - 1] if i else 1.0) for i in range(7)]
    assert moved == [False, False, True, False, False, True, False]
    # The inner Adam only counted its own two steps (bias correction as a separate optimizer).
    assert int(s.inner[0].count) == 2
    # First Adam step moves by exactly lr (bias-corrected m/sqrt(v) = 1).
    np.testing.assert_allclose(history[2], 0.9, rtol=1e-6)


def test_semantic_iteration_cycle():
    r = RecipeConfig(dual_iters=2, semantic_iters=1)
    assert [bool(semantic_iteration(jnp.asarray(s), r)) for s in range(9)] == [False, False, True] * 3


def test_torch_style_clip():
    g = {"a": jnp.array([3.0, 4.0])}
    out, n = torch_clip(g, 1.0)
    np.testing.assert_allclose(np.asarray(out["a"]), np.array([3.0, 4.0]) / (5 + 1e-6), rtol=1e-6)
    assert float(n) == pytest.approx(5.0)
    out, _ = torch_clip(g, 10.0)
    np.testing.assert_array_equal(np.asarray(out["a"]), [3.0, 4.0])


def test_gan_losses_hand_values():
    real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.0])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.5)
    assert float(D.hinge_d_loss(real, fake)) == pytest.approx(0.375)
    assert float(D.hinge_gen_loss(fake)) == pytest.approx(1.0)
    assert float(D.adopt_weight(0.5, jnp.asarray(18), 20)) == 0.0
    assert float(D.adopt_weight(0.5, jnp.asarray(19), 20)) == 0.5  # reference global_step = step + 1
    disc = D.PatchGANDiscriminator(ndf=8, n_layers=3)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    v = jax.eval_shape(lambda x: disc.init(jax.random.key(0), x, train=False), x)
    out = jax.eval_shape(lambda v, x: disc.apply(v, x, train=False), v, x)
    assert out.shape == (2, 2, 2, 1)  # 32 -> 16 -> 8 -> 4 -> 3 -> 2
    assert v["params"]["main_2"]["kernel"].shape == (4, 4, 8, 16) and "bias" not in v["params"]["main_2"]
    assert v["batch_stats"]["main_3"]["mean"].shape == (16,)


def _config():
    """One small dual config with the discriminator on, shared by the tests below (one compile)."""
    c = load_config("configs/tokenizer.py:tiny_dual")
    c.model.update(dict(ch=8, norm_groups=4, z_channels=16, codebook_size=24, semantic_codebook_size=16,
                        encoder_ch_mult=(1,), decoder_ch_mult=(1,)))  # one level: the cheapest compile
    c.loss.update(dict(disc_weight=0.5, disc_start=0, disc_dim=8, disc_num_layers=1))
    c.optim.lr = 1e-2
    c.recipe.update(dict(stage1_steps=2, usage_window=64))
    c.data.update(dict(name="digits", image_size=16))
    c.train.update(dict(global_batch=8, log_every=2, ckpt_every=2, keep_ckpts=2))
    return c


IMAGES = np.random.default_rng(0).uniform(-1, 1, (24, 16, 16, 3)).astype(np.float32)
DEVICES = jax.devices()[:1]  # one device: 8 simulated ones would multiply compile and run time


@pytest.fixture(scope="module")
def schedule_run():
    """2 stage-1 steps then 6 stage-2 steps, snapshotting the parameter groups after each."""
    from iar_jax.tokenizer.training import build_trainer

    trainer = build_trainer(_config(), DEVICES)  # as in train_and_evaluate below: compiled steps are reused
    state = trainer.init_state(0)
    batch = trainer.put_batch({"images": IMAGES[:8]})
    get = lambda st: jax.tree_util.tree_map(np.array, {
        "sem": st["params"]["quantize"]["embedding"], "det": st["params"]["quantize"]["embedding_second"],
        "enc": st["params"]["encoder"]["conv_in"]["kernel"], "disc": st["disc_params"]["main_0"]["kernel"]})
    snaps, metrics = [get(state)], []
    for step in range(8):
        if step == 2:
            state = trainer.reset_for_stage2(state)
        state, m = trainer.step_fn(trainer.stage_of(step))(state, batch)
        snaps.append(get(state))
        metrics.append(jax.device_get(m))
    return snaps, metrics


def test_stage2_updates_semantic_codebook_exactly_every_third_step(schedule_run):
    snaps, metrics = schedule_run
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["disc_loss"]) for m in metrics)
    changed = {k: [not np.array_equal(snaps[i + 1][k], snaps[i][k]) for i in range(8)] for k in snaps[0]}
    # Stage 1 (steps 0-1): C_S and the encoder train, C_D is frozen.
    # Stage 2 (steps 2-7): cycles (dual, dual, semantic): C_S moves only on steps 4 and 7.
    assert changed["sem"] == [True, True, False, False, True, False, False, True]
    assert changed["det"] == [False, False, True, True, True, True, True, True]
    assert all(changed["enc"]) and all(changed["disc"])
    assert [m.get("semantic_iteration", -1) for m in metrics[2:]] == [0, 0, 1, 0, 0, 1]
    assert "usage2" in metrics[-1] and "usage2" not in metrics[0]


def test_resume_matches_uninterrupted_run(tmp_path, schedule_run):
    import os

    from iar_jax.tokenizer.checkpoint import load_tokenizer

    c = _config()
    wd = str(tmp_path / "run")
    run = lambda wd, n, **kw: train_and_evaluate(c, wd, images=IMAGES, num_steps=n, devices=DEVICES, **kw)
    run(wd, 2)  # stops at the stage boundary
    _, resumed, _ = run(wd, 5, eval_images=IMAGES[:4])
    _, straight, res = run(None, 5, eval_images=IMAGES[:4])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           (resumed["params"], resumed["disc_params"], resumed["opt_state"]),
                           (straight["params"], straight["disc_params"], straight["opt_state"]))
    assert int(resumed["step"]) == 5
    assert set(res) >= {"psnr", "ssim", "usage", "usage_detail"} and 0 < res["usage"] <= 1
    assert os.path.exists(os.path.join(wd, "reconstructions.png"))
    # The saved tokenizer loads back (for reconstruct / extract_codes); a single config is refused.
    cfg, params = load_tokenizer(wd)
    assert cfg.dual and cfg.vocab_sizes == (16, 24)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), params, resumed["params"])
    with pytest.raises(ValueError, match="dual"):
        load_tokenizer(wd, VQConfig(**{**cfg.__dict__, "dual": False}))


def test_sigterm_saves_and_resumes(tmp_path, schedule_run):
    import signal

    c = _config()
    c.train.log_every = 1
    wd = str(tmp_path / "pre")

    def preempt_at_3(step, _):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    _, state, res = train_and_evaluate(c, wd, images=IMAGES, num_steps=6, devices=DEVICES, log_fn=preempt_at_3)
    assert int(state["step"]) == 3 and res == {}
    assert sorted(os.listdir(os.path.join(wd, "checkpoints")))[-1] == "3"  # off the ckpt_every=2 grid
    _, state, _ = train_and_evaluate(c, wd, images=IMAGES, num_steps=4, devices=DEVICES)
    assert int(state["step"]) == 4


def test_eight_devices_match_one_device(schedule_run):
    """Stage 1, the stage switch and stage 2 on a data 2 x fsdp 4 mesh give the one-device losses."""
    rows = {}
    for name, devices, mesh in (("one", DEVICES, {}), ("eight", jax.devices(), dict(data=2, fsdp=4))):
        c = _config()
        c.mesh.update(mesh)
        c.train.log_every = 1
        rows[name] = []
        trainer, state, _ = train_and_evaluate(c, None, images=IMAGES, num_steps=3, devices=devices,
                                               log_fn=lambda s, m, r=rows[name]: r.append(m))
    assert jax.device_count() == 8 and len(rows["one"]) == 3
    for a, b in zip(rows["one"], rows["eight"]):
        for k in ("loss", "rec_loss", "disc_loss", "grad_norm"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5)
    from jax.sharding import PartitionSpec as P

    kernel = state["params"]["encoder"]["conv_in"]["kernel"]  # [3, 3, 3, 8]: its 8 channels split 4 ways
    assert kernel.shape == (3, 3, 3, 8) and kernel.sharding.spec == P(None, None, None, "fsdp")
    moments = [x for x in jax.tree_util.tree_leaves(state["opt_state"]) if x.shape == kernel.shape]
    assert len(moments) >= 2 and all(x.sharding.spec == kernel.sharding.spec for x in moments)  # Adam mu, nu


def test_image_input_is_seeded_and_resumable(tmp_path):
    from PIL import Image

    from iar_jax import train_loop
    from iar_jax.tokenizer import data as data_lib

    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "sub")
    for i in range(5):  # a flat folder with one subfolder, images of several sizes
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(
            tmp_path / ("sub" if i == 4 else "") / f"{i}.png")
    c = _config()
    c.train.global_batch = 4
    folder = data_lib.ImageSource(data_lib.training_data("image_folder", "train", str(tmp_path), 3), 16, 3)
    assert len(folder) == 5 and folder.num_aug > 2
    first = [next(it)["images"] for it in [train_loop.batch_iterator(c, folder)] for _ in range(3)]
    assert first[0].shape == (4, 16, 16, 3) and first[0].dtype == np.float32 and np.abs(first[0]).max() <= 1
    again = train_loop.batch_iterator(c, folder)
    again.restore({"step": 1})
    np.testing.assert_array_equal(next(again)["images"], first[1])
    c.data.loader = "numpy"  # the unthreaded reader gives the same batches
    np.testing.assert_array_equal(next(train_loop.batch_iterator(c, folder))["images"], first[0])
    # Arrays: aug 1 is a horizontal flip.
    arrays = data_lib.ImageSource(IMAGES, 16, 3)
    got = arrays.get(np.array([3, 5]), np.array([0, 1]))["images"]
    np.testing.assert_array_equal(got, np.stack([IMAGES[3], IMAGES[5][:, ::-1]]))


def test_nan_guard_and_config_errors(tmp_path, schedule_run):
    bad = IMAGES.copy()
    bad[:] = np.nan
    with pytest.raises(FloatingPointError, match="non-finite loss nan and grad_norm nan at step 1.*none saved yet"):
        train_and_evaluate(_config(), str(tmp_path / "nan"), images=bad, num_steps=2, devices=DEVICES)
    assert not os.path.exists(tmp_path / "nan" / "checkpoints" / "2")
    with pytest.raises(ValueError, match="LPIPS is on .*perceptual_weight=0"):
        TokenizerTrainer(DUAL, LossConfig(perceptual_weight=1.0))
    with pytest.raises(ValueError, match="too small for the PatchGAN"):
        TokenizerTrainer(DUAL, LossConfig(perceptual_weight=0.0), image_shape=(8, 8, 3))
    cfg = load_config("configs/tokenizer.py:tiny")
    cfg.loss.perceptual_weight = 1.0
    cfg.loss.lpips_vgg_path = str(tmp_path / "vgg16.pth")
    from iar_jax.tokenizer.training import build_trainer

    with pytest.raises(ValueError, match="VGG16 weights file .* does not exist"):
        build_trainer(cfg)
    with pytest.raises(ValueError, match="unknown tokenizer variant"):
        load_config("configs/tokenizer.py:vq32")
