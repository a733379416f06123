"""Strict converters for the official tokenizer checkpoints (llamagen_vq, iar2_vq) and LPIPS."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from iar_jax.convert import ConversionError, from_torch, to_torch
from iar_jax.convert.vq import infer_config, load_state_dict
from iar_jax.tokenizer import VQConfig, init_params

SINGLE = VQConfig(codebook_size=24, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2), z_channels=16, ch=8,
                  num_res_blocks=1, norm_groups=4)
DUAL = VQConfig(**{**SINGLE.__dict__, "dual": True, "semantic_codebook_size": 16})


def _random_params(cfg, seed):
    rng = np.random.default_rng(seed)  # NumPy: eager jax.random per leaf would compile per shape
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)


@pytest.fixture(scope="module")
def single():
    params = _random_params(SINGLE, 0)
    return params, to_torch(params, "llamagen_vq", SINGLE)


@pytest.fixture(scope="module")
def dual():
    params = _random_params(DUAL, 1)
    return params, to_torch(params, "iar2_vq", DUAL)


def _assert_trees_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_published_key_names_and_layouts(single, dual):
    params, sd = single
    # Every module of the published layout, with OIHW convs and GroupNorm weight/bias.
    for key in ("encoder.conv_in.weight", "encoder.conv_blocks.0.res.0.norm1.weight",
                "encoder.conv_blocks.0.downsample.conv.weight", "encoder.conv_blocks.1.res.0.nin_shortcut.weight",
                "encoder.conv_blocks.2.attn.0.q.weight", "encoder.conv_blocks.2.attn.0.proj_out.bias",
                "encoder.mid.0.conv1.weight", "encoder.mid.1.norm.weight", "encoder.mid.2.conv2.bias",
                "encoder.norm_out.weight", "encoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight",
                "decoder.conv_in.weight", "decoder.mid.1.k.weight", "decoder.conv_blocks.0.attn.1.v.weight",
                "decoder.conv_blocks.0.res.1.conv2.weight", "decoder.conv_blocks.1.upsample.conv.weight",
                "decoder.conv_blocks.2.res.0.nin_shortcut.weight", "decoder.conv_out.bias",
                "quantize.embedding.weight"):
        assert key in sd, key
    assert "decoder.conv_blocks.2.upsample.conv.weight" not in sd  # no upsample after the last level
    assert "encoder.conv_blocks.2.downsample.conv.weight" not in sd
    assert sd["encoder.conv_in.weight"].shape == (8, 3, 3, 3)
    assert sd["encoder.conv_blocks.1.res.0.nin_shortcut.weight"].shape == (16, 8, 1, 1)
    assert sd["quantize.embedding.weight"].shape == (24, 8)
    # OIHW <-> HWIO: weight[o, i, a, b] == kernel[a, b, i, o]
    k = np.asarray(params["encoder"]["conv_blocks_0"]["res_0"]["conv1"]["kernel"])
    np.testing.assert_array_equal(sd["encoder.conv_blocks.0.res.0.conv1.weight"][5, 3, 2, 0], k[2, 0, 3, 5])
    np.testing.assert_array_equal(sd["encoder.conv_blocks.0.res.0.norm1.weight"],
                                  params["encoder"]["conv_blocks_0"]["res_0"]["norm1"]["scale"])
    dsd = dual[1]
    assert dsd["quantize.embedding.weight"].shape == (16, 8) and dsd["quantize.embedding_second"].shape == (24, 8)


def test_round_trips_are_exact(single, dual):
    for (params, sd), kind, cfg in ((single, "llamagen_vq", SINGLE), (dual, "iar2_vq", DUAL)):
        back = from_torch(sd, kind, cfg)
        _assert_trees_equal(back, params)
        sd2 = to_torch(back, kind, cfg)
        for k in sd:
            np.testing.assert_array_equal(sd2[k], sd[k])


def test_usage_buffers_and_wrappers_are_accepted(single):
    params, sd = single
    official = {"model": {**sd, "quantize.codebook_used": np.zeros(65536, np.float32)}, "steps": 7}
    _assert_trees_equal(load_state_dict(official, SINGLE), params)


def test_strict_errors_name_the_keys(single):
    params, sd = single
    broken = dict(sd)
    del broken["encoder.mid.1.q.bias"]
    broken["encoder.extra.weight"] = np.zeros(3)
    broken["decoder.conv_out.weight"] = np.zeros((3, 8, 1, 1))
    with pytest.raises(ConversionError) as e:
        from_torch(broken, "llamagen_vq", SINGLE)
    msg = str(e.value)
    assert "encoder.mid.1.q.bias" in msg and "encoder.extra.weight" in msg and "decoder.conv_out.weight" in msg
    assert "\n" not in msg


def test_single_dual_mixups_are_one_line_errors(single, dual):
    with pytest.raises(ConversionError, match="dual .*configs/tokenizer.py:iar2"):
        load_state_dict(dual[1], SINGLE)
    with pytest.raises(ConversionError, match="single-codebook .*dual=False"):
        load_state_dict(single[1], DUAL)
    with pytest.raises(ConversionError, match="iar2_vq"):
        from_torch(dual[1], "llamagen_vq", DUAL)


def test_infer_config_from_shapes(single, dual):
    cfg = infer_config(dual[1], norm_groups=4)
    assert cfg == DUAL
    assert infer_config(single[1], norm_groups=4) == SINGLE


# ------------------------------------------------------------------------------------------------
# LPIPS
# ------------------------------------------------------------------------------------------------


def _numpy_lpips(sd, x, y):
    """Independent NumPy LPIPS of two [N, H, W, 3] batches from a torchvision/LPIPS state dict."""
    from tests.test_tokenizer import _conv

    shift = np.array([-0.030, -0.088, -0.188])[None, :, None, None]
    scale = np.array([0.458, 0.448, 0.450])[None, :, None, None]

    def feats(im):
        h = (im.transpose(0, 3, 1, 2) - shift) / scale
        taps = []
        for layer in range(30):
            w = sd.get(f"features.{layer}.weight")
            if w is not None:
                h = np.maximum(_conv(h, w, sd[f"features.{layer}.bias"]), 0)
            elif layer in (4, 9, 16, 23):
                n, c, hh, ww = h.shape
                h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).max((3, 5))
            if layer in (3, 8, 15, 22, 29):
                taps.append(h)
        return taps

    total = 0
    for i, (a, b) in enumerate(zip(feats(x), feats(y))):
        a = a / (np.sqrt((a**2).sum(1, keepdims=True)) + 1e-10)
        b = b / (np.sqrt((b**2).sum(1, keepdims=True)) + 1e-10)
        d = np.einsum("nchw,c->nhw", (a - b) ** 2, sd[f"lin{i}.model.1.weight"][0, :, 0, 0])
        total = total + d.mean((1, 2))
    return total


def test_lpips_from_user_files_matches_numpy_reference(tmp_path):
    from iar_jax.convert.lpips import from_torchvision, load_lpips_params
    from iar_jax.tokenizer.lpips import CONV_OUT, LPIPS

    rng = np.random.default_rng(0)
    vgg, cin = {}, 3
    for i in sorted(CONV_OUT):
        vgg[f"features.{i}.weight"] = rng.normal(0, np.sqrt(2 / (9 * cin)), (CONV_OUT[i], cin, 3, 3)).astype(np.float32)
        vgg[f"features.{i}.bias"] = rng.normal(0, 0.01, CONV_OUT[i]).astype(np.float32)
        cin = CONV_OUT[i]
    vgg["classifier.0.weight"] = np.zeros((4, 4), np.float32)  # torchvision's head: ignored
    lin = {f"lin{k}.model.1.weight": rng.uniform(0, 0.1, (1, c, 1, 1)).astype(np.float32)
           for k, c in enumerate((64, 128, 256, 512, 512))}
    params = from_torchvision(vgg, lin)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    lpips = jax.jit(lambda p, a, b: LPIPS().apply({"params": p}, a, b))
    got = np.asarray(lpips(params, jnp.asarray(x), jnp.asarray(y)))
    want = _numpy_lpips({**vgg, **lin}, x.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=2e-4)
    assert np.allclose(np.asarray(lpips(params, jnp.asarray(x), jnp.asarray(x))), 0)
    # Round trip through the kind's own layout (net.slice{s}.{i}, lin{k}.model.1).
    sd = to_torch(params, "lpips", None)
    assert sd["net.slice3.12.weight"].shape == (256, 256, 3, 3) and sd["lin4.model.1.weight"].shape == (1, 512, 1, 1)
    _assert_trees_equal(from_torch({k: v for k, v in sd.items() if not k.startswith("scaling")}, "lpips", None), params)
    # Files on disk (npz works without torch); a missing file is a one-line error naming the fix.
    np.savez(tmp_path / "vgg.npz", **vgg)
    np.savez(tmp_path / "lin.npz", **lin)
    _assert_trees_equal(load_lpips_params(str(tmp_path / "vgg.npz"), str(tmp_path / "lin.npz")), params)
    with pytest.raises(ValueError, match="perceptual_weight=0"):
        load_lpips_params(str(tmp_path / "missing.pth"), str(tmp_path / "lin.npz"))
    with pytest.raises(ConversionError, match="features.99"):
        from_torchvision({**vgg, "features.99.weight": np.zeros(1)}, lin)
