"""Sampler: guidance schedules, filtering, the cached scan against the full forward, CFG, seeds.

References are computed here, independently of the code under test: hand values for the
schedules, NumPy for top-k / top-p, the model's own full-sequence forward for the cached steps and
a NumPy re-implementation of the GPT forward for the class-attention weights a_n.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iar_jax.models import cpu_kernels, gpt
from iar_jax.sampling import filtering, gpt_step, guidance, sampler
from iar_jax.sampling.filtering import SamplingConfig
from iar_jax.sampling.sampler import SamplerSpec, SubToken

CFG = gpt.GPTConfig(vocab_size=48, num_classes=5, dim=32, n_layer=2, n_head=2, grid_size=3, multiple_of=32)
T = CFG.num_tokens


@pytest.fixture(scope="module")
def model():
    module = gpt.GPT(CFG)
    shapes = gpt.abstract_params(CFG)
    rng = np.random.default_rng(0)
    # Random non-zero weights everywhere (the output head is zero-initialised by default); norm
    # scales near 1. NumPy draws: no per-leaf compilation.
    def draw(path, s):
        is_norm = "norm" in jax.tree_util.keystr(path)
        x = 1.0 + 0.1 * rng.normal(size=s.shape) if is_norm else 0.4 * rng.normal(size=s.shape)
        return jnp.asarray(x, jnp.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    return module, params


@pytest.fixture(scope="module")
def full_logits(model):
    module, params = model
    fn = jax.jit(lambda p, codes, labels: module.apply({"params": p}, codes, labels))
    return lambda codes, labels: np.asarray(fn(params, jnp.asarray(codes), jnp.asarray(labels)))


def _spec(sched=guidance.Constant(1.0), samp=SamplingConfig(), force_cfg=False):
    return SamplerSpec((SubToken(sched, samp),), force_cfg=force_cfg)


_SAMPLERS = {}


def _sampler(model, spec, record=False):
    module, _ = model
    key = (spec, record)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = sampler.make_sampler(gpt_step.step_fns(module, CFG), spec, record=record)
    return _SAMPLERS[key]


def _run(model, spec, labels, ids=None, seed=0, record=False):
    _, params = model
    labels = jnp.asarray(labels, jnp.int32)
    ids = jnp.arange(labels.shape[0], dtype=jnp.int32) if ids is None else jnp.asarray(ids, jnp.int32)
    out = _sampler(model, spec, record)(params, labels, ids, jax.random.key(seed))
    return jax.tree_util.tree_map(np.asarray, out)


# ----------------------------------------------------------------------------------------------
# Guidance schedules (pure functions) against hand-computed values


def test_schedules_by_hand():
    assert float(guidance.Constant(2.5)(3, 10)) == 2.5
    it = guidance.Interval(4.0, num_tokens=2)
    assert [float(it(n, 5)) for n in range(5)] == [4.0, 4.0, 1.0, 1.0, 1.0]
    lin = guidance.Linear(1.0, 3.0)
    np.testing.assert_allclose([float(lin(n, 5)) for n in range(5)], [1.0, 1.5, 2.0, 2.5, 3.0], rtol=1e-6)
    # IAR2: w = n/(T-1) + w_attn·a ; s = start·(1 − w) + end·w. n=2, T=5, a=0.4, w_attn=0.05:
    # w = 0.5 + 0.02 = 0.52 ; s = 1.75·0.48 + 3.0·0.52 = 0.84 + 1.56 = 2.4
    ag = guidance.AttentionGuided(1.75, 3.0, 0.05)
    np.testing.assert_allclose(np.asarray(ag(2, 5, jnp.array([0.4, 0.0]))), [2.4, 2.375], rtol=1e-6)
    # w is not clipped: n = T-1 with a = 1 gives w = 1.05 -> 1.75·(−0.05) + 3·1.05 = 3.0625
    np.testing.assert_allclose(float(ag(4, 5, jnp.array(1.0))), 3.0625, rtol=1e-6)
    # T = 1: the reference uses a step weight of 0.5.
    np.testing.assert_allclose(float(lin(0, 1)), 2.0, rtol=1e-6)
    assert guidance.Constant(1.0).unguided and guidance.Linear(1.0, 1.0).unguided
    assert not guidance.AttentionGuided(1.0, 1.0001, 0.1).unguided


def test_guidance_config_errors_are_one_line():
    with pytest.raises(ValueError, match=r"missing end, w_attn.*guidance\.end=\.\.\. guidance\.w_attn=\.\.\.") as e:
        guidance.from_dict({"kind": "attention", "start": 1.75})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="missing scale"):
        guidance.from_dict({"kind": "constant"})
    with pytest.raises(ValueError, match="unknown; use one of"):
        guidance.from_dict({"kind": "cosine", "scale": 2})
    assert guidance.from_dict({"kind": "interval", "scale": 3, "num_tokens": 7}) == guidance.Interval(3.0, 7)


# ----------------------------------------------------------------------------------------------
# Filtering against NumPy


def _np_top_p_keep(logits, p):
    """Reference: sort by probability, keep the smallest prefix whose mass is >= p."""
    keep = np.zeros(logits.shape, bool)
    for r, row in enumerate(logits):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        mass = 0.0
        for i in order:
            keep[r, i] = True
            mass += probs[i]
            if mass >= p:
                break
    return keep


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_smallest_prefix_with_mass_p(p):
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(6, 40)) * rng.uniform(0.5, 4, size=(6, 1))).astype(np.float32)
    out = np.asarray(filtering.top_p_filter(jnp.asarray(logits), p))
    np.testing.assert_array_equal(np.isfinite(out), _np_top_p_keep(logits.astype(np.float64), p))
    np.testing.assert_array_equal(out[np.isfinite(out)], logits[np.isfinite(out)])  # kept logits untouched


def test_top_p_boundary_cases():
    # probs (0.5, 0.3, 0.2): the first token alone has mass 0.5, the first two 0.8.
    logits = np.log(np.array([[0.3, 0.5, 0.2]], np.float64)).astype(np.float32)
    keep = lambda p: np.isfinite(np.asarray(filtering.top_p_filter(jnp.asarray(logits), p)))[0].tolist()  # noqa: E731
    assert keep(0.01) == keep(0.45) == [False, True, False]
    assert keep(0.55) == keep(0.79) == [True, True, False]
    assert keep(0.81) == keep(1.0) == [True, True, True]


def test_top_k_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 30)).astype(np.float32)
    out = np.asarray(filtering.top_k_filter(jnp.asarray(logits), 5))
    for row, o in zip(logits, out):
        assert set(np.flatnonzero(np.isfinite(o))) == set(np.argsort(-row)[:5])


def test_sampling_config_errors():
    for p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"top_p=.* is outside \(0, 1\]; use 1.0 to turn"):
            SamplingConfig(top_p=p).validate()
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1).validate()
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        SamplingConfig(top_k=100).validate(48)


def test_cfg_mix_is_reference_formula():
    rng = np.random.default_rng(3)
    c, u = rng.normal(size=(3, 10)).astype(np.float32), rng.normal(size=(3, 10)).astype(np.float32)
    rows = np.stack([c, u], 1).reshape(6, 10)  # interleaved (cond, uncond) pairs
    spec = _spec(guidance.AttentionGuided(1.5, 3.0, 0.1))
    ctx = sampler.SampleContext(spec, jnp.int32(2), 5, 3, None)
    attn = np.array([0.2, 0.5, 0.9], np.float32)
    mixed, scale = ctx.guide(0, jnp.asarray(rows), jnp.asarray(attn))
    w = 2 / 4 + 0.1 * attn
    s = 1.5 * (1 - w) + 3.0 * w
    np.testing.assert_allclose(np.asarray(scale), s, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mixed), u + s[:, None] * (c - u), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The cached scan against the full forward


@pytest.mark.parametrize("out_major", [False, True])
def test_cached_steps_equal_full_forward_at_every_position(model, full_logits, out_major):
    """Teacher-force codes through the sampler's own step (unrolled layers, CFG rows; input-major
    kernels as on accelerators, output-major as on CPU) and compare the logits it hands to the
    draw with the full-sequence forward, at every position."""
    module, params = model
    sf = gpt_step.step_fns(module, CFG, out_major=out_major)
    spec = _spec(force_cfg=True)
    rng = np.random.default_rng(4)
    B = 4
    codes = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    labels = np.array([0, 3, 4, 1], np.int32)

    class Forced(sampler.SampleContext):
        def sample(self, j, logits, attn=None):
            self.seen = logits
            return jnp.asarray(codes)[:, self.n]

    @jax.jit
    def run(p):
        p = sf.prepare(p)
        state = sf.init_state(p, sampler.row_labels(jnp.asarray(labels), CFG.num_classes, True))

        def body(state, n):
            ctx = Forced(spec, n, T, B, None)
            state, _ = sf.step(p, state, ctx)
            return state, ctx.seen

        return jax.lax.scan(body, state, jnp.arange(T))[1]  # [T, 2B, V]

    seen = np.asarray(run(params))
    want_c = full_logits(codes, labels)
    want_u = full_logits(codes, np.full_like(labels, CFG.num_classes))
    np.testing.assert_allclose(seen[:, 0::2].transpose(1, 0, 2), want_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(seen[:, 1::2].transpose(1, 0, 2), want_u, rtol=1e-5, atol=1e-5)


def test_greedy_samples_are_argmax_of_full_forward(model, full_logits):
    labels = np.array([1, 2, 2, 4], np.int32)
    toks = _run(model, _spec(samp=SamplingConfig(temperature=0.0)), labels)[..., 0]
    np.testing.assert_array_equal(toks, full_logits(toks, labels).argmax(-1))


def test_top_k_one_equals_greedy(model):
    labels = np.array([0, 1, 2, 3], np.int32)
    greedy = _run(model, _spec(samp=SamplingConfig(temperature=0.0)), labels)
    topk1 = _run(model, _spec(samp=SamplingConfig(temperature=1.0, top_k=1)), labels, seed=7)
    np.testing.assert_array_equal(topk1, greedy)


def test_guidance_scale_one_equals_unguided(model):
    labels = np.array([0, 1, 2, 3, 4, 0], np.int32)
    plain = _run(model, _spec(), labels, seed=3)
    cfg1 = _run(model, _spec(guidance.Constant(1.0), force_cfg=True), labels, seed=3)
    np.testing.assert_array_equal(cfg1, plain)
    guided = _run(model, _spec(guidance.Constant(4.0)), labels, seed=3)
    assert (guided != plain).any()  # guidance does change the samples


def test_results_depend_on_global_index_not_batch(model):
    spec = _spec(guidance.Constant(4.0))
    labels = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3], np.int32)
    ids = np.arange(100, 109)
    first = _run(model, spec, labels[:6], ids[:6], seed=3)
    second = _run(model, spec, labels[3:], ids[3:], seed=3)  # samples 103..105 sit at other batch rows
    np.testing.assert_array_equal(first[3:], second[:3])
    other_seed = _run(model, spec, labels[:6], ids[:6], seed=1)
    assert (other_seed != first).any()


# ----------------------------------------------------------------------------------------------
# Attention-guided CFG against independently recomputed attention weights


def _np_rope(grid, head_dim, base=10000.0):
    half = head_dim // 2
    freqs = 1.0 / base ** (np.arange(0, half, 2)[: half // 2] / half)
    rows = np.repeat(np.arange(grid), grid)
    cols = np.tile(np.arange(grid), grid)
    ang = np.concatenate([np.outer(rows, freqs), np.outer(cols, freqs)], 1)  # [G², half]
    cos = np.concatenate([np.zeros((1, half)), np.cos(ang)])  # class position: all zeros
    sin = np.concatenate([np.zeros((1, half)), np.sin(ang)])
    return cos, sin


def _np_class_attention(params, labels, codes):
    """Last layer's head-mean softmax weight from every query position to key 0 (NumPy, float64)."""
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    blk = p["transformer"]["layers"]["block"]
    Dh = CFG.head_dim
    x = np.concatenate([p["cls_embedding"]["embedding_table"][labels][:, None],
                        p["tok_embeddings"]["embedding"][codes[:, :-1]]], 1)  # [B, S, D]
    S = x.shape[1]
    cos, sin = _np_rope(CFG.grid_size, Dh)

    def norm(v, w):
        return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + CFG.norm_eps) * w

    def rope(v):  # v [B, S, H, Dh], adjacent pairs
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = cos[None, :S, None], sin[None, :S, None]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * c - b * s, b * c + a * s
        return out

    causal = np.tril(np.ones((S, S), bool))
    for layer in range(CFG.n_layer):
        w = jax.tree_util.tree_map(lambda t: t[layer], blk)
        h = norm(x, w["attention_norm"]["weight"])
        qkv = np.einsum("bsd,dthe->bsthe", h, w["attention"]["wqkv"]["kernel"])
        q, k, v = rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2]
        sc = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(Dh)
        sc = np.where(causal, sc, -np.inf)
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        a0 = pr[:, :, :, 0].mean(1)  # [B, S]: query position -> class key, head mean
        x = x + np.einsum("bhqk,bkhe,hed->bqd", pr, v, w["attention"]["wo"]["kernel"])
        h = norm(x, w["ffn_norm"]["weight"])
        f = h @ w["feed_forward"]["w1"]["kernel"]
        x = x + ((f / (1 + np.exp(-f))) * (h @ w["feed_forward"]["w3"]["kernel"])) @ w["feed_forward"]["w2"]["kernel"]
    return a0  # of the last layer


def test_attention_guided_scales_match_recomputed_attention(model):
    _, params = model
    sched = guidance.AttentionGuided(1.75, 3.0, 0.05)
    labels = np.array([0, 2, 4], np.int32)
    toks, rec = _run(model, _spec(sched), labels, record=True)
    a = _np_class_attention(params, labels, toks[..., 0])  # [B, T]: query of position n = sequence index n
    n = np.arange(T)[None]
    w = n / (T - 1) + 0.05 * a
    want = 1.75 * (1 - w) + 3.0 * w
    np.testing.assert_allclose(rec["attn"][..., 0], a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rec["scale"][..., 0], want, rtol=1e-5, atol=1e-6)
    assert np.all(a[:, 0] == 1.0) and np.all(a[:, 1:] < 1.0)  # the class query only sees itself


def test_label_errors():
    with pytest.raises(ValueError, match=r"class label 5 is outside \[0, 5\); labels must be < num_classes"):
        sampler.check_labels(np.array([0, 5]), 5)
    with pytest.raises(ValueError, match="class label -1"):
        sampler.check_labels(np.array([-1]), 5)


def test_spec_must_match_sub_tokens(model):
    module, params = model
    spec = SamplerSpec((SubToken(), SubToken()))
    with pytest.raises(ValueError, match="2 sub-token settings but the model draws 1"):
        sampler.sample_tokens(gpt_step.step_fns(module, CFG), spec, params, jnp.zeros((2,), jnp.int32),
                              jnp.arange(2), jax.random.key(0))


def test_unstack_layers_round_trip(model):
    _, params = model
    flat = gpt_step.unstack_layers(params, CFG.n_layer)
    assert "layers" not in flat["transformer"] and "layers_1" in flat["transformer"]
    np.testing.assert_array_equal(flat["transformer"]["layers_1"]["attention"]["wo"]["kernel"],
                                  params["transformer"]["layers"]["block"]["attention"]["wo"]["kernel"][1])


def test_out_major_kernels_are_transposes(model):
    """The CPU decode layout: every block kernel and the head transposed, w1/w3 stacked as w13."""
    _, params = model
    flat = gpt_step.unstack_layers(params, CFG.n_layer)
    _, cfg, _ = gpt_step.decode_model(gpt.GPT, CFG, (), gpt.abstract_params, out_major=True)
    om = cpu_kernels.transpose_kernels(flat, gpt.abstract_params(cfg))
    blk, src = om["transformer"]["layers_1"], flat["transformer"]["layers_1"]
    np.testing.assert_array_equal(om["output"]["kernel_t"], np.asarray(params["output"]["kernel"]).T)
    np.testing.assert_array_equal(blk["attention"]["wo"]["kernel_t"],
                                  np.moveaxis(np.asarray(src["attention"]["wo"]["kernel"]), -1, 0))
    np.testing.assert_array_equal(blk["attention"]["wqkv"]["kernel_t"],
                                  np.moveaxis(np.asarray(src["attention"]["wqkv"]["kernel"]), 0, -1))
    ff = src["feed_forward"]
    np.testing.assert_array_equal(blk["feed_forward"]["w13"]["kernel_t"],
                                  np.stack([np.asarray(ff["w1"]["kernel"]).T, np.asarray(ff["w3"]["kernel"]).T]))
    np.testing.assert_array_equal(blk["feed_forward"]["w2"]["kernel_t"], np.asarray(ff["w2"]["kernel"]).T)
    np.testing.assert_array_equal(om["tok_embeddings"]["embedding"], params["tok_embeddings"]["embedding"])
    with pytest.raises(ValueError, match="same model config"):
        cpu_kernels.transpose_kernels(flat, gpt.abstract_params(dataclasses.replace(cfg, dim=64, n_head=4)))


@pytest.mark.parametrize("rows", [3, 40])  # the multiply-reduce (decode) and the dot path
def test_out_major_dense_matches_numpy(rows):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(rows, 2, 4, 6)).astype(np.float32)
    w = rng.normal(size=(4, 6, 5)).astype(np.float32)  # input-major [H, Dh, out], like wo
    layer = cpu_kernels.OutMajorDense((5,), ("heads", "kv", "embed"), n_in=2)
    y = layer.apply({"params": {"kernel_t": jnp.asarray(np.moveaxis(w, -1, 0))}}, jnp.asarray(x))
    np.testing.assert_allclose(y, np.einsum("bshd,hdo->bso", x, w), rtol=1e-5, atol=1e-5)
