"""IAR2 AR model: local-context window, forward vs a NumPy reference, causality, cached sampling,
parameter counts, converter, training through the shared trainer, one-line errors."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from iar_jax.models import local_context
from iar_jax.convert import ConversionError, from_torch, to_torch
from iar_jax.models import iar2
from iar_jax.models.iar2 import IAR2, IAR2Config
from iar_jax.sampling import sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=16, detail_vocab_size=24, num_classes=5, dim=48, n_layer=2, n_head=2, head_layers=2,
            grid_size=4, multiple_of=32, dtype="float32")


def load_config(arg):
    from iar_jax.config_lib import load_config as load

    return load(os.path.join(ROOT, "configs", f"iar2.py:{arg}"))


# ----------------------------------------------------------------------------------------------
# Window


def brute_force_window(H, W):
    idx = np.zeros((H * W, 13), np.int64)
    mask = np.zeros((H * W, 13), bool)
    for i in range(H):
        for j in range(W):
            cells = [(i - 2, j + d) for d in (-2, -1, 0, 1, 2)] + [(i - 1, j + d) for d in (-2, -1, 0, 1, 2)]
            cells += [(i, j - 2), (i, j - 1), (i, j)]
            for s, (r, c) in enumerate(cells):
                if 0 <= r < H and 0 <= c < W:
                    idx[i * W + j, s] = r * W + c
                    mask[i * W + j, s] = True
    return idx, mask


@pytest.mark.parametrize("side", [4, 7, 16, 24])
def test_window_matches_brute_force(side):
    idx, mask = local_context.window_table(side, side)
    ref_idx, ref_mask = brute_force_window(side, side)
    assert idx.shape == mask.shape == (side * side, 13)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(np.where(mask, idx, -1), np.where(ref_mask, ref_idx, -1))
    np.testing.assert_array_equal(idx[~mask], 0)
    pos = np.arange(side * side)[:, None]
    assert np.all(idx[mask] <= np.broadcast_to(pos, idx.shape)[mask])  # causal
    np.testing.assert_array_equal(idx[:, 12], pos[:, 0])
    # Hand-checked corner cases: cell (0, 0) sees only itself; (2, 2) sees a full window.
    assert mask[0].tolist() == [False] * 12 + [True]
    if side >= 5:
        p = 2 * side + 2
        assert mask[p].all()
        assert idx[p, :5].tolist() == list(range(0, 5)) and idx[p, 10:].tolist() == [p - 2, p - 1, p]


def test_non_square_token_count_is_one_line_error():
    with pytest.raises(ValueError, match="not a square"):
        local_context.grid_side(12)
    assert local_context.grid_side(576) == 24


# ----------------------------------------------------------------------------------------------
# NumPy reference of the IAR2 forward (written from SPEC §4-5, independent of the Flax code)


def np_rope_rows(positions_cells, grid, hd, base=10000.0):
    """positions_cells: grid-cell index per sequence row, or None for the zero (class) row."""
    half = hd // 2
    freqs = 1.0 / base ** (np.arange(0, half, 2)[: half // 2] / half)
    rows = []
    for cell in positions_cells:
        if cell is None:
            rows.append(np.zeros((half, 2)))
            continue
        r, c = divmod(cell, grid)
        ang = np.concatenate([r * freqs, c * freqs])
        rows.append(np.stack([np.cos(ang), np.sin(ang)], -1))
    return np.stack(rows)


def np_rope(x, table):  # x [L, H, Dh]
    xr = x.reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[:, None, :, 0], table[:, None, :, 1]
    out = np.stack([xr[..., 0] * cos - xr[..., 1] * sin, xr[..., 1] * cos + xr[..., 0] * sin], -1)
    return out.reshape(x.shape)


def np_rms(x, w, eps=1e-5):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def np_gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def np_mlp(p, x):
    h = np_gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    y = h @ p["fc2"]["kernel"]
    return y + p["fc2"]["bias"] if "bias" in p["fc2"] else y


def np_blocks(stack, x, table):
    """Causal pre-norm blocks over one sequence x [L, D] (stacked params, layer axis first)."""
    blk = stack["layers"]["block"]
    n = blk["attention_norm"]["weight"].shape[0]
    for i in range(n):
        p = jax.tree_util.tree_map(lambda a: a[i], blk)
        h = np_rms(x, p["attention_norm"]["weight"])
        qkv = np.einsum("ld,dthk->lthk", h, p["attention"]["wqkv"]["kernel"])
        q, k, v = np_rope(qkv[:, 0], table), np_rope(qkv[:, 1], table), qkv[:, 2]
        s = np.einsum("lhd,shd->hls", q, k) / np.sqrt(q.shape[-1])
        L = x.shape[0]
        s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        o = np.einsum("hls,shd->lhd", s, v)
        x = x + np.einsum("lhd,hde->le", o, p["attention"]["wo"]["kernel"])
        h = np_rms(x, p["ffn_norm"]["weight"])
        f = p["feed_forward"]
        a = h @ f["w1"]["kernel"]
        x = x + ((a / (1 + np.exp(-a))) * (h @ f["w3"]["kernel"])) @ f["w2"]["kernel"]
    return x


def np_iar2(params, cfg, codes, det, labels):
    P = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    G, T, D = cfg.grid_size, cfg.num_tokens, cfg.dim
    hd = D // cfg.n_head
    cells = [None] + [((p - 1) // 2 if cfg.official_rope else p - 1) for p in range(1, T)]
    trunk_table = np_rope_rows(cells, G, hd)
    head_table = np_rope_rows([None, 0, 0] if cfg.official_rope else [None, 0, 1], G, hd)
    idx, mask = brute_force_window(G, G)
    sem_out, det_out = [], []
    for b in range(codes.shape[0]):
        es = P["sem_embedding"]["embedding"][codes[b]]
        fused = np_mlp(P["fusion"], np.concatenate([es, P["det_embedding"]["embedding"][det[b]]], -1))
        x = np.concatenate([P["cls_embedding"]["embedding_table"][labels[b]][None], fused[:-1]])
        h = np_blocks(P["trunk"], x, trunk_table)  # no final norm on the trunk
        s_l, d_l = [], []
        for t in range(T):
            win = np.where(mask[t, :12, None], h[idx[t, :12]], 0.0)  # zeros go through mlp1, as reference
            ctx = np_mlp(P["local_context"]["mlp2"], np_mlp(P["local_context"]["mlp1"], win).reshape(-1))
            out = np_blocks(P["head"], np.stack([ctx, h[t], es[t]]), head_table)
            out = np_rms(out, P["head"]["norm"]["weight"])
            s_l.append(np_mlp(P["sem_output"], out[1]))
            d_l.append(np_mlp(P["det_output"], out[2]))
        sem_out.append(s_l)
        det_out.append(d_l)
    return np.asarray(sem_out), np.asarray(det_out)


def randomize(params, seed, std=0.2):
    """Random values everywhere (the zero-initialised output layers would hide errors); RMSNorm
    weights near 1. NumPy, so no per-shape compilation."""
    rng = np.random.default_rng(seed)

    def f(path, x):
        r = rng.standard_normal(x.shape).astype(np.float32)
        return 1.0 + 0.1 * r if "norm" in jax.tree_util.keystr(path) else std * r

    return jax.tree_util.tree_map_with_path(f, params)


@functools.lru_cache(maxsize=None)
def make_model(official_rope):
    cfg = IAR2Config(official_rope=official_rope, **TINY).validate()
    module = IAR2(cfg)
    params = randomize(iar2.abstract_params(cfg), 1)
    fwd = jax.jit(lambda p, a, b, c: module.apply({"params": p}, a, b, c))
    rng = np.random.default_rng(0)
    B, T = 2, cfg.num_tokens
    data = (rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.detail_vocab_size, (B, T)),
            rng.integers(0, cfg.num_classes, (B,)))
    sem, det = fwd(params, *data)
    return dict(cfg=cfg, module=module, params=params, fwd=fwd, data=data, sem=np.asarray(sem), det=np.asarray(det))


@pytest.fixture(scope="module", params=[True, False], ids=["official_rope", "proper_rope"])
def model(request):
    return make_model(request.param)


def test_forward_matches_numpy_reference(model):
    ref_sem, ref_det = np_iar2(model["params"], model["cfg"], *model["data"])
    assert model["sem"].shape == ref_sem.shape == (2, 16, 16) and model["det"].shape == (2, 16, 24)
    scale = max(np.abs(ref_sem).max(), np.abs(ref_det).max())
    np.testing.assert_allclose(model["sem"], ref_sem, atol=1e-4 * scale)
    np.testing.assert_allclose(model["det"], ref_det, atol=1e-4 * scale)


def test_loss_is_weighted_sum_of_ces(model):
    codes, det, _ = model["data"]

    def ce(logits, t):
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        return np.mean(lse - np.take_along_axis(logits, t[..., None], -1)[..., 0])

    loss, m = jax.jit(iar2.iar2_loss, static_argnums=4)(model["sem"], model["det"], codes, det, 2.0)
    np.testing.assert_allclose(m["semantic_ce"], ce(model["sem"], codes), rtol=1e-5)
    np.testing.assert_allclose(m["detail_ce"], ce(model["det"], det), rtol=1e-5)
    np.testing.assert_allclose(loss, 2.0 * ce(model["sem"], codes) + ce(model["det"], det), rtol=1e-5)


def test_causality(model):
    codes, det, labels = (np.array(x) for x in model["data"])
    t = 6
    c2, d2 = codes.copy(), det.copy()
    c2[:, t:] = (c2[:, t:] + 3) % model["cfg"].vocab_size
    d2[:, t:] = (d2[:, t:] + 5) % model["cfg"].detail_vocab_size
    sem, dt = (np.asarray(x) for x in model["fwd"](model["params"], c2, d2, labels))
    # Semantic logits at ≤ t see only tokens < t; detail logits at t also see k_t (teacher-forced).
    np.testing.assert_array_equal(sem[:, : t + 1], model["sem"][:, : t + 1])
    np.testing.assert_array_equal(dt[:, :t], model["det"][:, :t])
    assert np.abs(dt[:, t] - model["det"][:, t]).max() > 1e-3  # k_t feeds the detail head
    assert np.abs(sem[:, t + 1:] - model["sem"][:, t + 1:]).max() > 1e-3


class ForcedContext(sampler.SampleContext):
    """The shared sampler's context (row layout, CFG mixing, schedules), but it feeds given ids
    instead of drawing and records the guided logits."""

    def __init__(self, spec, n, T, B, forced):
        super().__init__(spec, n, T, B, None)
        self.forced, self.logits = forced, {}

    def sample(self, j, logits, attn=None):
        self.logits[j], _ = self.guide(j, logits, attn)
        return self.forced[j]


def test_cached_cfg_step_equals_teacher_forced():
    """The sampler step (KV cache, window buffer, head cache, attention-guided CFG over interleaved
    cond/uncond rows) along a fixed sequence == the teacher-forced forward of both rows, mixed."""
    from iar_jax.sampling.guidance import AttentionGuided

    model = make_model(True)  # the decode path is the same for both RoPE layouts; one compile
    cfg, module, params, fwd = model["cfg"], model["module"], model["params"], model["fwd"]
    codes, det, labels = (jnp.asarray(x) for x in model["data"])
    B, T = codes.shape
    fns = iar2.sampling_step_fns(module, cfg)
    spec = sampler.SamplerSpec((sampler.SubToken(AttentionGuided(1.75, 3.0, 0.05)),
                                sampler.SubToken(AttentionGuided(1.5, 2.5, 0.1))))
    assert fns.sub_tokens == ("semantic", "detail") and fns.num_positions == T

    @jax.jit
    def run(params):
        params = fns.prepare(params)  # bf16 cast (no-op in fp32) + unstacked layers, as the sampler does
        state = fns.init_state(params, sampler.row_labels(labels, cfg.num_classes, True))

        def body(st, n):
            ctx = ForcedContext(spec, n, T, B, (codes[:, n], det[:, n]))
            st, toks = fns.step(params, st, ctx)
            return st, (ctx.logits[0], ctx.logits[1], toks, ctx.records[0][0], ctx.records[1][0], ctx.records[0][1])

        return jax.lax.scan(body, state, jnp.arange(T))[1]

    sem, dt, toks, s_sem, s_det, attn = (np.swapaxes(np.asarray(x), 0, 1) for x in run(params))
    np.testing.assert_array_equal(toks, np.stack([codes, det], -1))
    # Position 0: the class query sees only itself, so a_0 = 1 and s_0 = start(1 − w) + end·w with w = w_attn.
    np.testing.assert_allclose(attn[:, 0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(s_sem[:, 0], 1.75 * 0.95 + 3.0 * 0.05, rtol=1e-6)
    np.testing.assert_allclose(s_det[:, 0], 1.5 * 0.9 + 2.5 * 0.1, rtol=1e-6)
    assert np.all((attn[:, 1:] > 0) & (attn[:, 1:] < 1))
    w = np.arange(T) / (T - 1) + 0.1 * attn  # both schedules see the same a_n
    np.testing.assert_allclose(s_det, 1.5 * (1 - w) + 2.5 * w, rtol=1e-5)
    c_sem, c_det = model["sem"], model["det"]
    u_sem, u_det = (np.asarray(x) for x in fwd(params, codes, det, jnp.full_like(labels, cfg.num_classes)))
    mix = lambda s, c, u: s[..., None] * c + (1 - s[..., None]) * u
    for got, want in ((sem, mix(s_sem, c_sem, u_sem)), (dt, mix(s_det, c_det, u_det))):
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)  # 1e-5 of the logit scale
    assert np.abs(c_sem - u_sem).max() > 1e-2  # the class matters, so the CFG mix is really tested


# ----------------------------------------------------------------------------------------------
# Sizes and conversion


@pytest.mark.parametrize("size,millions", [("b", 143.1), ("l", 408.2), ("xl", 884.3), ("xxl", 1570.1)])
def test_parameter_counts(size, millions):
    config = load_config(size)
    _, cfg = iar2.IAR2_FAMILY.build(config)
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(iar2.abstract_params(cfg)))
    assert abs(n / 1e6 - millions) / millions < 1e-3, n


def test_converter_round_trip_and_strictness():
    cfg = IAR2Config(**dict(TINY, dim=96, n_head=4)).validate()
    params = randomize(iar2.abstract_params(cfg), 3)
    sd = to_torch(params, "iar2_gpt", cfg)
    d = cfg.dim
    expected = {  # official key -> torch shape ([out, in] linears)
        "tok_embeddings1.weight": (16, d), "tok_embeddings2.weight": (24, d),
        "cls_embedding.embedding_table.weight": (6, d), "norm.weight": (d,),
        "aggregation_layer.0.weight": (4 * d, 2 * d), "aggregation_layer.0.bias": (4 * d,),
        "aggregation_layer.2.weight": (d, 4 * d), "aggregation_layer.2.bias": (d,),
        "mlp1.0.weight": (d // 4, d), "mlp1.0.bias": (d // 4,), "mlp1.2.weight": (d // 12, d // 4),
        "mlp2.0.weight": (2 * d, 12 * (d // 12)), "mlp2.0.bias": (2 * d,), "mlp2.2.weight": (d, 2 * d),
        "output1.0.weight": (2 * d, d), "output1.0.bias": (2 * d,), "output1.2.weight": (16, 2 * d),
        "output2.0.weight": (2 * d, d), "output2.0.bias": (2 * d,), "output2.2.weight": (24, 2 * d),
        "layers.1.attention.wqkv.weight": (3 * d, d), "factorized_blocks.1.feed_forward.w2.weight": (d, 256),
    }
    for k, shape in expected.items():
        assert sd[k].shape == shape, k
    assert not any(k.startswith(("layers.2.", "factorized_blocks.2.")) for k in sd)
    assert len(sd) == 20 + 7 * (2 + 2)  # 20 non-block tensors + 7 per block (2 trunk + 2 head blocks)
    back = from_torch(sd, "iar2_gpt", cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    # Torch-side values are plain transposes of the Flax kernels.
    np.testing.assert_array_equal(sd["mlp2.0.weight"], params["local_context"]["mlp2"]["fc1"]["kernel"].T)
    np.testing.assert_array_equal(sd["factorized_blocks.1.attention_norm.weight"],
                                  params["head"]["layers"]["block"]["attention_norm"]["weight"][1])
    # Strict: missing, unexpected and mis-shaped keys are all named.
    bad = dict(sd)
    del bad["mlp1.0.bias"]
    with pytest.raises(ConversionError, match="missing keys: mlp1.0.bias"):
        from_torch(bad, "iar2_gpt", cfg)
    with pytest.raises(ConversionError, match="unexpected keys: factorized_blocks.5.ffn_norm.weight"):
        from_torch(dict(sd, **{"factorized_blocks.5.ffn_norm.weight": np.ones(d)}), "iar2_gpt", cfg)
    with pytest.raises(ConversionError, match="mis-shaped keys: output2.2.weight"):
        from_torch(dict(sd, **{"output2.2.weight": np.zeros((4096, 2 * d))}), "iar2_gpt", cfg)


# ----------------------------------------------------------------------------------------------
# Training through the shared trainer; input errors


def test_tiny_iar2_overfits_one_batch():
    """Through the family API the shared trainer uses (build, batch_spec, init, make_loss,
    check_batch) and its optimizer; params come from eval_shape (no init compile)."""
    import flax.linen as nn
    import optax

    from iar_jax.models.families import get_family
    from iar_jax.trainer import decay_mask, make_optimizer

    config = load_config("tiny")
    with config.unlocked():
        for k in ("token_dropout", "resid_dropout", "ffn_dropout", "class_dropout"):
            config.model[k] = 0.0
        config.optim.lr, config.optim.schedule, config.optim.weight_decay = 3e-3, "constant", 0.0
    fam = get_family(config.model_family)
    module, _ = fam.build(config)
    spec = fam.batch_spec(config)
    assert set(spec) == {"codes", "detail_codes", "labels"}
    rng = np.random.default_rng(0)
    m = config.model
    hi = {"codes": m.vocab_size, "detail_codes": m.detail_vocab_size, "labels": m.num_classes}
    batch = {k: rng.integers(0, hi[k], (4,) + shape).astype(dt) for k, (shape, dt) in spec.items()}
    fam.check_batch(batch, config)
    boxed = jax.eval_shape(lambda: fam.init(module, jax.random.PRNGKey(0), batch))["params"]
    params = randomize(nn.unbox(boxed), 4, std=0.02)
    for out in ("sem_output", "det_output"):  # zero-initialised, as in the model
        params[out]["fc2"]["kernel"] = np.zeros_like(params[out]["fc2"]["kernel"])
    tx, _ = make_optimizer(config.optim, 100, decay_mask(boxed))
    loss_fn = fam.make_loss(module, config)

    @jax.jit
    def train_step(params, opt_state, batch, rng):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, True)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    opt_state = tx.init(params)
    history = []
    for i in range(60):
        params, opt_state, metrics = train_step(params, opt_state, batch, jax.random.PRNGKey(i))
        history.append(jax.device_get(metrics))
    first, last = history[0], history[-1]
    # Zero output layers: semantic CE = ln 16, detail CE = ln 64 at the first step.
    np.testing.assert_allclose(first["semantic_ce"], np.log(16), rtol=1e-5)
    np.testing.assert_allclose(first["detail_ce"], np.log(64), rtol=1e-5)
    np.testing.assert_allclose(first["loss"], np.log(16) + np.log(64), rtol=1e-5)  # w1 = 1
    assert last["loss"] < 0.1 * first["loss"], (first["loss"], last["loss"])
    assert last["semantic_acc"] >= 0.95 and last["detail_acc"] >= 0.95


def test_batch_errors_are_one_line():
    config = load_config("tiny")
    ok = {"codes": np.zeros((2, 16), np.int32), "detail_codes": np.zeros((2, 16), np.int32),
          "labels": np.zeros((2,), np.int32)}
    iar2.check_batch(ok, config)
    cases = [
        ({"detail_codes": None}, "no 'detail_codes'"),
        ({"codes": np.full((2, 16), 16, np.int32)}, "semantic code id 16 is outside"),
        ({"detail_codes": np.full((2, 16), -1, np.int32)}, "detail code id -1 is outside"),
        ({"codes": np.zeros((2, 15), np.int32), "detail_codes": np.zeros((2, 15), np.int32)}, "not a square"),
        ({"labels": np.full((2,), 10, np.int32)}, "class label id 10"),
    ]
    for change, msg in cases:
        batch = dict(ok, **change)
        batch = {k: v for k, v in batch.items() if v is not None}
        with pytest.raises(ValueError, match=msg) as e:
            iar2.check_batch(batch, config)
        assert "\n" not in str(e.value)
    cfg = IAR2Config(**TINY)
    with pytest.raises(ValueError, match="grid_size=4"):
        jax.eval_shape(lambda: IAR2(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 9), jnp.int32),
                                              jnp.zeros((1, 9), jnp.int32), jnp.zeros((1,), jnp.int32)))


def test_config_presets():
    assert load_config("tiny").model.official_rope  # parity with released weights by default
    assert not load_config("tiny,rope=2d").model.official_rope
    assert load_config("xl,grid=16,w1=2").loss.semantic_weight == 2.0
    with pytest.raises(ValueError, match="rope='x' is not official or 2d"):
        load_config("b,rope=x")
