"""Generation at scale: device-count independence, chunked resumable output, npz/grid, glue errors."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from iar_jax.sampling import generate as gen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The device-count check, runnable in this process (conftest gives 8 CPU devices) or, when the
# session has fewer devices, in a subprocess whose XLA_FLAGS are set before jax is imported.
_DEVICE_CHECK = textwrap.dedent("""
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    import ml_collections
    from iar_jax import sharding
    from iar_jax.models import gpt
    from iar_jax.sampling import generate as gen, gpt_step, guidance
    from iar_jax.sampling.sampler import SamplerSpec, SubToken
    from iar_jax.sampling.filtering import SamplingConfig

    def tokens_on(n_devices):
        cfg = gpt.GPTConfig(vocab_size=40, num_classes=5, dim=32, n_layer=2, n_head=2, grid_size=3, multiple_of=32)
        module = gpt.GPT(cfg)
        mesh_cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=(
            ("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
            ("vocab", "tensor"), ("kv", None), ("length", None), ("layers", None), ("norm", None), ("classes", None))))
        mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:n_devices])
        init = lambda r: module.init(r, jnp.zeros((1, cfg.num_tokens), jnp.int32), jnp.zeros((1,), jnp.int32))
        boxed = jax.eval_shape(init, jax.random.PRNGKey(0))["params"]
        shardings = sharding.logical_shardings(boxed, mesh, mesh_cfg)
        params = nn.unbox(init(jax.random.PRNGKey(1))["params"])
        params["output"]["kernel"] = 0.5 * jax.random.normal(jax.random.PRNGKey(2), params["output"]["kernel"].shape)
        params = jax.device_put(params, shardings)
        spec = SamplerSpec((SubToken(guidance.Linear(1.5, 3.0), SamplingConfig(1.0, 0, 0.95)),))
        fn = gen.make_sharded_sampler(gpt_step.step_fns(module, cfg), spec, mesh, shardings)
        labels = np.arange(16, dtype=np.int32) % 5
        ids = np.arange(16, dtype=np.int32) + 1000
        put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
        out = fn(params, put(labels), put(ids), jax.random.key(42))
        assert len(out.sharding.device_set) == n_devices
        return np.asarray(out)

    one, eight = tokens_on(1), tokens_on(8)
    np.testing.assert_array_equal(one, eight)
    assert len(np.unique(one)) > 5
    print("DEVICE_CHECK_OK")
""")


def test_same_seed_same_samples_on_1_and_8_devices():
    if jax.device_count() >= 8:
        exec(compile(_DEVICE_CHECK, "device_check", "exec"), {})
        return
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _DEVICE_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert "DEVICE_CHECK_OK" in r.stdout, r.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# Chunked generation with a fake model and decoder


def _fake_decode(codes):
    # codes [G, 9, 1] -> [G, 6, 6, 3] images in [-1, 1] (each code a 2×2 block).
    g = codes.shape[0]
    x = (np.asarray(codes, np.float32)[..., 0] / 20.0 - 1.0).reshape(g, 3, 3)
    x = np.repeat(np.repeat(x, 2, 1), 2, 2)
    return np.stack([x, -x, 0.5 * x], -1)


class _FakeSampler:
    """Codes depend only on (label, global id, seed), like the real sampler."""

    def __init__(self):
        self.calls = 0

    def __call__(self, params, labels, ids, key):
        self.calls += 1
        labels, ids = np.asarray(labels), np.asarray(ids)
        seed = int(jax.random.key_data(key).ravel()[-1])
        return ((labels[:, None, None] * 7 + ids[:, None, None] * 3 + seed + np.arange(9)[None, :, None]) % 40
                ).astype(np.int32)


@pytest.fixture(scope="module")
def mesh():
    from jax.sharding import Mesh

    return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def test_generate_pads_trims_writes_and_resumes(tmp_path, mesh):
    labels = gen.class_labels(10, 5, seed=0)
    out = str(tmp_path / "run")
    fake = _FakeSampler()
    kw = dict(global_batch=4, mesh=mesh, decode_fn=_fake_decode, num_classes=5, seed=3, grid=6, progress=False)
    s = gen.generate(fake, None, labels, out, **kw)
    assert s["chunks"] == 3 and fake.calls == 3  # 10 samples, batch 4: last chunk padded with 2 dummies
    with np.load(os.path.join(out, "samples.npz")) as z:
        arr, lab = z["arr_0"], z["labels"]
    assert arr.shape == (10, 6, 6, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(lab, labels)
    # Reference conversion: clamp(127.5·x + 128, 0, 255) -> uint8, per sample from its global index.
    codes = fake(None, labels, np.arange(10), jax.random.key(3))
    np.testing.assert_array_equal(arr, np.clip(127.5 * _fake_decode(codes) + 128, 0, 255).astype(np.uint8))
    from PIL import Image

    assert Image.open(os.path.join(out, "grid.png")).size == (3 * 6, 2 * 6)

    # A killed run: chunk 1 missing -> only it is sampled again, the result is identical.
    os.remove(os.path.join(out, "chunks", "chunk_000001.npz"))
    fake.calls = 0
    s = gen.generate(fake, None, labels, out, **kw)
    assert fake.calls == 1 and s["sampled_chunks"] == 1
    with np.load(os.path.join(out, "samples.npz")) as z:
        np.testing.assert_array_equal(z["arr_0"], arr)
    with pytest.raises(ValueError, match=r"holds samples made with other settings \(seed\); use a fresh --out"):
        gen.generate(fake, None, labels, out, **dict(kw, seed=4))


def test_unreadable_chunks_are_named_and_redone(tmp_path, mesh, caplog):
    labels = gen.class_labels(10, 5, seed=0)
    out = str(tmp_path / "run")
    fake = _FakeSampler()
    kw = dict(global_batch=4, mesh=mesh, decode_fn=_fake_decode, num_classes=5, seed=3, grid=0, progress=False)
    gen.generate(fake, None, labels, out, **kw)
    with np.load(os.path.join(out, "samples.npz")) as z:
        want = z["arr_0"]
    chunk = lambda c: os.path.join(out, "chunks", f"chunk_{c:06d}.npz")  # noqa: E731
    # Truncated (as a full disk leaves it): named in a warning, moved aside and sampled again.
    with open(chunk(2), "r+b") as f:
        f.truncate(100)
    fake.calls = 0
    gen.generate(fake, None, labels, out, **kw)
    assert fake.calls == 1 and f"sampling chunk {chunk(2)} is unreadable" in caplog.text
    assert os.path.getsize(chunk(2) + ".corrupt") == 100
    with np.load(os.path.join(out, "samples.npz")) as z:
        np.testing.assert_array_equal(z["arr_0"], want)
    # One flipped image byte only shows at assembly (CRC): a one-line error naming the chunk, no
    # partial samples.npz.tmp, the previous samples.npz untouched; the next run redoes the chunk.
    with open(chunk(0), "r+b") as f:
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0xFF]))
    before = os.path.getmtime(os.path.join(out, "samples.npz"))
    with pytest.raises(ValueError, match=f"sampling chunk {chunk(0)} is unreadable; moved it to .*run the same"):
        gen.generate(fake, None, labels, out, **kw)
    assert not os.path.exists(os.path.join(out, "samples.npz.tmp"))
    assert os.path.getmtime(os.path.join(out, "samples.npz")) == before
    fake.calls = 0
    gen.generate(fake, None, labels, out, **kw)
    assert fake.calls == 1
    with np.load(os.path.join(out, "samples.npz")) as z:
        np.testing.assert_array_equal(z["arr_0"], want)


def test_generate_resize_and_batch_errors(tmp_path, mesh):
    labels = gen.class_labels(0, 4, per_class=2)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2, 3, 3])
    s = gen.generate(_FakeSampler(), None, labels, str(tmp_path), global_batch=8, mesh=mesh, decode_fn=_fake_decode,
                     num_classes=4, resize=4, grid=0, progress=False)
    assert s["image_shape"] == [4, 4, 3]
    with pytest.raises(ValueError, match="class label 4 is outside"):
        gen.generate(_FakeSampler(), None, np.array([4]), str(tmp_path / "x"), global_batch=8, mesh=mesh,
                     decode_fn=_fake_decode, num_classes=4)


def test_class_labels():
    lab = gen.class_labels(0, 1000, per_class=50)
    assert lab.shape == (50_000,) and np.all(np.bincount(lab) == 50)
    with pytest.raises(ValueError, match=r"num_samples=100 != per_class 50 × num_classes 1000"):
        gen.class_labels(100, 1000, per_class=50)
    r = gen.class_labels(20, 7, seed=1)
    assert r.min() >= 0 and r.max() < 7
    np.testing.assert_array_equal(r, gen.class_labels(20, 7, seed=1))


# ----------------------------------------------------------------------------------------------
# Image conversion


def test_bicubic_weights_by_hand():
    # in 4 -> out 2 (scale 2): output 0 samples src 0.5 (t = 0.5); a = -0.75 kernel at ±0.5, ±1.5:
    # 0.59375 and -0.09375; index -1 is clamped onto 0.
    np.testing.assert_allclose(gen.bicubic_matrix(4, 2)[0], [0.5, 0.59375, -0.09375, 0.0], atol=1e-7)
    m = gen.bicubic_matrix(384, 256)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
    img = np.full((1, 12, 12, 3), 0.25, np.float32)
    np.testing.assert_allclose(np.asarray(gen.resize_bicubic(img, 8)), 0.25, atol=1e-6)


def test_bicubic_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 12, 12, 3)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(8, 8), mode="bicubic")
    np.testing.assert_allclose(np.asarray(gen.resize_bicubic(x, 8)), want.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_npz_stream_writer(tmp_path):
    p = str(tmp_path / "a.npz")
    w = gen.NpzStreamWriter(p, (5, 2, 2, 3))
    data = np.arange(60, dtype=np.uint8).reshape(5, 2, 2, 3)
    w.write(data[:2])
    w.write(data[2:])
    w.close(labels=np.array([1, 2, 3, 4, 5]))
    with np.load(p) as z:
        np.testing.assert_array_equal(z["arr_0"], data)
        np.testing.assert_array_equal(z["labels"], [1, 2, 3, 4, 5])


# ----------------------------------------------------------------------------------------------
# Settings glue


def test_make_spec_and_errors():
    spec = gen.make_spec(("semantic", "detail"), "attention", None, "1.75,1.5", "3.0", "0.05", None, top_k="0,10")
    assert spec.sub_tokens[0].guidance.start == 1.75 and spec.sub_tokens[1].guidance.start == 1.5
    assert spec.sub_tokens[1].guidance.end == 3.0 and spec.sub_tokens[1].sampling.top_k == 10
    with pytest.raises(ValueError, match=r"guidance\[token\] kind 'linear' is missing end"):
        gen.make_spec(("token",), "linear", cfg_start="1.0")
    with pytest.raises(ValueError, match=r"top_p=0.0 is outside \(0, 1\]"):
        gen.make_spec(("token",), cfg_scale="2", top_p="0")
    with pytest.raises(ValueError, match="has 3 values but the model draws 2"):
        gen.make_spec(("semantic", "detail"), cfg_scale="1,2,3")


def test_vocab_mismatch_error():
    gen.check_vocab((256, 4096), (256, 4096))
    # The config is what the user passes wrong: the message names it, not the checkpoint.
    with pytest.raises(ValueError, match=r"config's model has vocab \(16384,\) \(config.model.vocab_size\) but the "
                                         r"tokenizer has \(8192,\) codes; pass the config"):
        gen.check_vocab((16384,), (8192,))


def test_parse_checkpoint():
    from iar_jax.sampling.generate import parse_checkpoint

    assert parse_checkpoint("latest") == (None, False)
    assert parse_checkpoint("ema") == (None, True)
    assert parse_checkpoint("1200") == (1200, False)
    assert parse_checkpoint("1200:ema") == (1200, True)
    with pytest.raises(ValueError, match="is not latest, a step number, ema or STEP:ema"):
        parse_checkpoint("best")


def test_decode_fn_maps_rearranged_ids_back():
    seen = []
    decoder = lambda c: seen.append(np.asarray(c) if not isinstance(c, tuple) else tuple(map(np.asarray, c))) or 0.0  # noqa: E731
    mapping = np.random.default_rng(0).permutation(16)  # old id -> new id
    codes_new = np.random.default_rng(1).integers(0, 16, (2, 9, 1)).astype(np.int32)
    gen.make_decode_fn(decoder, 3, new_order=np.argsort(mapping))(codes_new)
    old = seen[-1]
    assert old.shape == (2, 3, 3)
    np.testing.assert_array_equal(mapping[old].reshape(2, 9), codes_new[..., 0])  # back in the original codebook
    gen.make_decode_fn(decoder, 3)(codes_new)
    np.testing.assert_array_equal(seen[-1].reshape(2, 9), codes_new[..., 0])
    dual = np.stack([codes_new[..., 0], codes_new[..., 0] + 100], -1)
    gen.make_decode_fn(decoder, 3, dual=True)(dual)
    sem, det = seen[-1]
    np.testing.assert_array_equal(det - sem, 100)
