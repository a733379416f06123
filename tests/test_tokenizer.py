"""VQ tokenizer: shapes, quantizers vs brute force, straight-through gradients, layout vs a NumPy
reference of the LlamaGen modules, API errors."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from configs.tokenizer import VARIANTS, get_config
from iar_jax.tokenizer import VQConfig, VQModel, VQTokenizer, build_model, init_params
from iar_jax.tokenizer.quantizer import DualQuantizer, VectorQuantizer, entropy_loss
from iar_jax.tokenizer.config import model_config_from


# A very small config: 2 levels (4x downsample would need 3), 8-channel groups.
TINY = VQConfig(codebook_size=32, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=16, ch=8,
                num_res_blocks=1, norm_groups=4)
TINY_DUAL = VQConfig(**{**TINY.__dict__, "dual": True, "semantic_codebook_size": 16})


@pytest.mark.parametrize("variant", VARIANTS)
def test_preset_shapes(variant):
    cfg = model_config_from(get_config(variant))
    f = cfg.downsample_factor
    assert f == {"vq16": 16, "iar2": 16, "vq8": 8, "tiny7": 4}.get(variant, 2)
    size = 2 * f
    model = build_model(cfg)

    def init_encode_decode(rng, x):  # one trace (no compile) for all three shapes
        params = model.init(rng, x)["params"]
        codes = model.apply({"params": params}, x, method=VQModel.encode)
        return params, codes, model.apply({"params": params}, codes, method=VQModel.decode)

    params, codes, out = jax.eval_shape(init_encode_decode, jax.random.key(0),
                                        jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32))
    if cfg.dual:
        assert [c.shape for c in codes] == [(3, 2, 2), (3, 2, 2)]
        assert params["quantize"]["embedding"].shape == (256, 8)
        assert params["quantize"]["embedding_second"].shape == (cfg.codebook_size, 8)
    else:
        assert codes.shape == (3, 2, 2) and params["quantize"]["embedding"].shape == (cfg.codebook_size, 8)
    assert out.shape == (3, size, size, 3)
    if variant == "tiny":  # bf16 compute: params, quantizer and outputs stay fp32
        bf = build_model(VQConfig(**{**cfg.__dict__, "dtype": "bfloat16"}))
        out16 = jax.eval_shape(lambda p, x: bf.apply({"params": p}, x)[0], params,
                               jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32))
        assert out16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))
    if variant == "vq16":  # LlamaGen VQ-16 has ~72M parameters
        n = sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(params))
        assert 70e6 < n < 74e6


def _normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def test_single_quantizer_is_nearest_normalized_code():
    q = VectorQuantizer(64, 8, beta=0.25)
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2, 3, 5, 8)).astype(np.float32) * 3.0
    # Raw (un-normalised) codebook rows: the quantizer must normalise them itself.
    raw = (rng.normal(size=(64, 8)) * np.linspace(0.1, 5, 64)[:, None]).astype(np.float32)
    out = jax.jit(q.apply)({"params": {"embedding": jnp.asarray(raw)}}, z)
    zn, cb = _normalize(np.asarray(z)).reshape(-1, 8), _normalize(raw)
    d = ((zn[:, None, :] - cb[None]) ** 2).sum(-1)
    k = np.asarray(out.codes).reshape(-1)
    np.testing.assert_allclose(d[np.arange(len(k)), k], d.min(1), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.z_q).reshape(-1, 8), cb[k], atol=1e-6)
    mse = np.mean((cb[k] - zn) ** 2)
    np.testing.assert_allclose(float(out.vq_loss), mse, rtol=1e-5)
    np.testing.assert_allclose(float(out.commit_loss), 0.25 * mse, rtol=1e-5)
    assert float(out.entropy_loss) == 0.0


def test_dual_quantizer_semantic_plus_detail():
    q = DualQuantizer(16, 40, 8)
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
    raw_s = (rng.normal(size=(16, 8)) * 2.0).astype(np.float32)
    raw_d = (rng.normal(size=(40, 8)) * 0.3).astype(np.float32)  # C_D is used as stored
    apply = jax.jit(q.apply, static_argnames=("mode", "method"))
    out = apply(out_params(raw_s, raw_d), z)
    k, j = (np.asarray(c).reshape(-1) for c in out.codes)
    zn, cs = _normalize(np.asarray(z)).reshape(-1, 8), _normalize(raw_s)
    ds = ((zn[:, None] - cs[None]) ** 2).sum(-1)
    np.testing.assert_allclose(ds[np.arange(len(k)), k], ds.min(1), atol=1e-6)
    r = zn - cs[k]
    dd = ((r[:, None] - raw_d[None]) ** 2).sum(-1)
    np.testing.assert_allclose(dd[np.arange(len(j)), j], dd.min(1), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.z_q).reshape(-1, 8), cs[k] + raw_d[j], atol=1e-6)
    # Lookup of the pair gives the same latents; semantic mode uses C_S only.
    np.testing.assert_allclose(np.asarray(apply(out_params(raw_s, raw_d), out.codes, method=DualQuantizer.lookup)),
                               np.asarray(out.z_q), atol=1e-6)
    sem = apply(out_params(raw_s, raw_d), z, mode="semantic")
    np.testing.assert_array_equal(np.asarray(sem.codes).reshape(-1), k)
    np.testing.assert_allclose(np.asarray(sem.z_q).reshape(-1, 8), cs[k], atol=1e-6)


def out_params(raw_s, raw_d):
    return {"params": {"embedding": jnp.asarray(raw_s), "embedding_second": jnp.asarray(raw_d)}}


def test_straight_through_gradient_is_identity():
    q = VectorQuantizer(16, 4, l2_norm=False)
    rng = np.random.default_rng(0)
    z, w = (rng.normal(size=(1, 2, 2, 4)).astype(np.float32) for _ in range(2))
    p = {"params": {"embedding": rng.normal(size=(16, 4)).astype(np.float32)}}
    g = jax.jit(jax.grad(lambda z: jnp.sum(q.apply(p, z).z_q * w)))(z)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)


def test_entropy_loss_matches_numpy():
    a = np.random.default_rng(0).normal(size=(12, 7)) * 0.05
    x = a / 0.01
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    logp = np.log(p)  # log_softmax is shift invariant (the +1e-5 of the reference changes nothing)
    avg = p.mean(0)
    want = -np.mean((p * logp).sum(1)) + np.sum(avg * np.log(avg + 1e-5))
    np.testing.assert_allclose(float(jax.jit(entropy_loss)(jnp.asarray(a, jnp.float32))), want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Full model: one init per config shared by the tests below
# ------------------------------------------------------------------------------------------------


def _np_params(cfg, seed):
    """Random params in the model's layout, drawn with NumPy (no compiled init: fast tests)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))

    def draw(path, a):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, 1 / np.sqrt(np.prod(a.shape[:-1])), a.shape).astype(np.float32)
        if name == "scale":
            return (1 + 0.1 * rng.normal(size=a.shape)).astype(np.float32)
        if name.startswith("embedding"):
            return rng.normal(size=a.shape).astype(np.float32)
        return (0.1 * rng.normal(size=a.shape)).astype(np.float32)  # biases

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def tiny():
    return VQTokenizer(TINY, _np_params(TINY, 0))


@pytest.fixture(scope="module")
def tiny_dual():
    return VQTokenizer(TINY_DUAL, _np_params(TINY_DUAL, 1))


def _images(n=2, size=8, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def test_gradients_reach_encoder_through_straight_through():
    cfg = VQConfig(**{**TINY.__dict__, "encoder_ch_mult": (1,), "decoder_ch_mult": (1,)})  # cheapest compile
    model, params = build_model(cfg), _np_params(cfg, 2)
    x = jnp.asarray(_images(size=4))

    def loss(p):
        recon, q = model.apply({"params": p}, x, train=True)
        return jnp.mean((recon - x) ** 2)  # pixel loss only: the encoder gets it via z + sg(z_q - z)

    g = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(g["encoder"]["conv_in"]["kernel"]).sum()) > 0
    assert float(jnp.abs(g["quant_conv"]["kernel"]).sum()) > 0
    # ... while the codebook only learns from the vq loss (no gradient through the straight-through path).
    assert float(jnp.abs(g["quantize"]["embedding"]).sum()) == 0


# --- NumPy reference of LlamaGen's VQModel, from the torch-layout state dict ---------------------


def _conv(x, w, b=None, stride=1, pad=(1, 1, 1, 1)):
    """x [N, C, H, W], w [O, I, kh, kw] (torch layout); pad = (top, bottom, left, right)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[1]), (pad[2], pad[3])))
    o, i, kh, kw = w.shape
    ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], o, ho, wo))
    for a in range(kh):
        for c in range(kw):
            patch = x[:, :, a:a + stride * ho:stride, c:c + stride * wo:stride]
            out += np.einsum("nihw,oi->nohw", patch, w[:, :, a, c])
    return out + (0 if b is None else b[None, :, None, None])


def _gn(x, w, b, groups, eps=1e-6):
    n, c, h, ww = x.shape
    g = x.reshape(n, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    return g.reshape(n, c, h, ww) * w[None, :, None, None] + b[None, :, None, None]


def _swish(x):
    return x / (1 + np.exp(-x))


class _NumpyVQ:
    def __init__(self, sd, cfg):
        self.sd, self.cfg = {k: np.asarray(v, np.float64) for k, v in sd.items()}, cfg

    def conv(self, p, x, **kw):
        return _conv(x, self.sd[p + ".weight"], self.sd[p + ".bias"], **kw)

    def norm(self, p, x):
        return _gn(x, self.sd[p + ".weight"], self.sd[p + ".bias"], self.cfg.norm_groups)

    def res(self, p, x):
        h = self.conv(p + ".conv1", _swish(self.norm(p + ".norm1", x)))
        h = self.conv(p + ".conv2", _swish(self.norm(p + ".norm2", h)))
        if p + ".nin_shortcut.weight" in self.sd:
            x = self.conv(p + ".nin_shortcut", x, pad=(0, 0, 0, 0))
        return x + h

    def attn(self, p, x):
        h = self.norm(p + ".norm", x)
        q, k, v = (self.conv(f"{p}.{n}", h, pad=(0, 0, 0, 0)) for n in "qkv")
        n, c, hh, ww = q.shape
        q, k, v = (t.reshape(n, c, hh * ww) for t in (q, k, v))
        w = np.einsum("nci,ncj->nij", q, k) * c**-0.5
        w = np.exp(w - w.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("nij,ncj->nci", w, v).reshape(n, c, hh, ww)
        return x + self.conv(p + ".proj_out", o, pad=(0, 0, 0, 0))

    def encode_latent(self, x):
        cfg, n = self.cfg, len(self.cfg.encoder_ch_mult)
        h = self.conv("encoder.conv_in", x)
        for l in range(n):
            for i in range(cfg.num_res_blocks):
                h = self.res(f"encoder.conv_blocks.{l}.res.{i}", h)
                if l == n - 1:
                    h = self.attn(f"encoder.conv_blocks.{l}.attn.{i}", h)
            if l != n - 1:
                h = self.conv(f"encoder.conv_blocks.{l}.downsample.conv", h, stride=2, pad=(0, 1, 0, 1))
        h = self.res("encoder.mid.2", self.attn("encoder.mid.1", self.res("encoder.mid.0", h)))
        h = self.conv("encoder.conv_out", _swish(self.norm("encoder.norm_out", h)))
        return self.conv("quant_conv", h, pad=(0, 0, 0, 0))

    def decode_latent(self, z):
        cfg, n = self.cfg, len(self.cfg.decoder_ch_mult)
        h = self.conv("decoder.conv_in", self.conv("post_quant_conv", z, pad=(0, 0, 0, 0)))
        h = self.res("decoder.mid.2", self.attn("decoder.mid.1", self.res("decoder.mid.0", h)))
        for i in range(n):
            for r in range(cfg.num_res_blocks + 1):
                h = self.res(f"decoder.conv_blocks.{i}.res.{r}", h)
                if i == 0:
                    h = self.attn(f"decoder.conv_blocks.{i}.attn.{r}", h)
            if i != n - 1:
                h = self.conv(f"decoder.conv_blocks.{i}.upsample.conv", h.repeat(2, 2).repeat(2, 3))
        return self.conv("decoder.conv_out", _swish(self.norm("decoder.norm_out", h)))


def test_forward_matches_numpy_reference_of_published_layout(tiny):
    from iar_jax.convert import to_torch

    sd = to_torch(tiny.params, "llamagen_vq", TINY)
    ref = _NumpyVQ(sd, TINY)
    x = _images(size=8, seed=3)
    lat = ref.encode_latent(x.transpose(0, 3, 1, 2))
    codes = np.asarray(tiny.encode(x))
    cb = _normalize(ref.sd["quantize.embedding.weight"])
    zn = _normalize(lat.transpose(0, 2, 3, 1))
    want_codes = np.argmin(((zn[..., None, :] - cb) ** 2).sum(-1), -1)
    np.testing.assert_array_equal(codes, want_codes)
    rec_ref = ref.decode_latent(cb[want_codes].transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    rec = np.asarray(tiny.decode(codes, clip=False))
    assert np.linalg.norm(rec - rec_ref) / np.linalg.norm(rec_ref) < 1e-4


def test_dual_encode_decode(tiny_dual):
    x = _images(size=8, seed=5)
    k, j = tiny_dual.encode(x)
    assert k.shape == j.shape == (2, 4, 4) and int(k.max()) < 16 and int(j.max()) < 32
    out = tiny_dual.decode((np.asarray(k), np.asarray(j)))
    assert out.shape == (2, 8, 8, 3) and float(jnp.abs(out).max()) <= 1.0


def test_one_line_errors(tiny, tiny_dual):
    with pytest.raises(ValueError, match="not divisible by the tokenizer's downsample factor 2"):
        tiny.encode(_images(size=7))
    with pytest.raises(ValueError, match="channels.*NCHW"):
        tiny.encode(_images().transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="out of range"):
        tiny.decode(np.full((1, 4, 4), 32))
    with pytest.raises(ValueError, match="detail codes out of range"):
        tiny_dual.decode((np.zeros((1, 4, 4), np.int32), np.full((1, 4, 4), -1)))
    with pytest.raises(ValueError, match="pair"):
        tiny_dual.decode(np.zeros((1, 4, 4), np.int32))
    with pytest.raises(ValueError, match="dual"):
        VQTokenizer(TINY, tiny_dual.params)
    with pytest.raises(ValueError, match="single codebook"):
        VQTokenizer(TINY_DUAL, tiny.params)
    with pytest.raises(ValueError, match="norm_groups"):
        VQConfig(ch=12, norm_groups=8).validate()
    for msg in (str(e) for e in []):
        assert "\n" not in msg

