"""LlamaGen GPT: published parameter counts, RoPE table, KV-cache decoding, converter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iar_jax.config_lib import load_config
from iar_jax.convert import ConversionError, from_torch, to_torch
from iar_jax.models.families import get_family
from iar_jax.models import gpt


@pytest.mark.parametrize("size,expected_m", [("b", 110.9), ("l", 342.9), ("xl", 774.7), ("xxl", 1411.0)])
def test_published_parameter_counts(size, expected_m):
    cfg = load_config(f"configs/iar.py:{size}")
    _, model_cfg = get_family("iar").build(cfg)
    assert (model_cfg.vocab_size, model_cfg.num_classes) == (16384, 1000)
    assert round(gpt.count_params(gpt.abstract_params(model_cfg)) / 1e6, 1) == expected_m


def test_ffn_hidden_sizes():
    assert [gpt.GPTConfig(dim=d).ffn_dim for d in (768, 1024, 1280, 1536)] == [2048, 2816, 3584, 4096]


def test_rope_table_2d_by_hand():
    t = gpt.rope_table_2d(grid_size=3, head_dim=8, base=10000.0, cls_token_num=1)
    assert t.shape == (10, 4, 2)
    assert np.all(t[0] == 0)  # class position: cos = sin = 0
    # head_dim 8 -> 2 frequencies (1, 10000^-0.5); pairs 0-1 rotate by the row, 2-3 by the column.
    freqs = np.array([1.0, 10000 ** -0.5])
    row, col = 2, 1
    angles = np.concatenate([row * freqs, col * freqs])
    np.testing.assert_allclose(t[1 + row * 3 + col, :, 0], np.cos(angles), rtol=1e-6)
    np.testing.assert_allclose(t[1 + row * 3 + col, :, 1], np.sin(angles), rtol=1e-6)


def test_apply_rope_rotates_adjacent_pairs():
    x = np.arange(8, dtype=np.float32).reshape(1, 1, 1, 8)
    ang = np.array([0.3, -1.2, 0.7, 2.0], np.float32)
    table = np.stack([np.cos(ang), np.sin(ang)], -1)[None]
    out = np.asarray(gpt.apply_rope(jnp.asarray(x), jnp.asarray(table)))[0, 0, 0]
    for i in range(4):
        a, b = x[0, 0, 0, 2 * i], x[0, 0, 0, 2 * i + 1]
        c, s = np.cos(ang[i]), np.sin(ang[i])
        np.testing.assert_allclose(out[2 * i: 2 * i + 2], [a * c - b * s, b * c + a * s], rtol=1e-5, atol=1e-6)


def _tiny(scan):
    return gpt.GPTConfig(vocab_size=32, num_classes=5, dim=32, n_layer=2, n_head=2, grid_size=3, scan_layers=scan)


@pytest.mark.parametrize("scan", [True, False])
def test_cached_decode_equals_full_forward(scan):
    cfg = _tiny(scan)
    model = gpt.GPT(cfg)
    shapes = gpt.abstract_params(cfg)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    # Random (non-zero) output head too, so logits are informative.
    params = jax.tree_util.tree_unflatten(treedef, [0.3 * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])
    codes = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 32)
    labels = jnp.array([4, 0])
    full = jax.jit(model.apply)({"params": params}, codes, labels)
    decode = jax.jit(lambda tok, pos, cache: model.apply({"params": params}, tok, pos, cache, method=gpt.GPT.decode))
    cache = gpt.init_cache(cfg, 2)
    step_logits, cache, _ = model.apply({"params": params}, labels, cache, method=gpt.GPT.prefill)
    got = [step_logits]
    for t in range(8):
        lg, cache, _ = decode(codes[:, t], jnp.int32(t + 1), cache)
        got.append(lg)
    np.testing.assert_allclose(np.stack(got, 1), full, rtol=1e-5, atol=1e-5)
    # Causality: changing the last code leaves every logit unchanged (it is never an input).
    full2 = jax.jit(model.apply)({"params": params}, codes.at[:, -1].set((codes[:, -1] + 1) % 32), labels)
    np.testing.assert_array_equal(full, full2)


def test_converter_round_trip_and_strictness():
    cfg = _tiny(True)
    shapes = gpt.abstract_params(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    sd = to_torch(params, "llamagen_gpt", cfg)
    assert sd["layers.1.attention.wqkv.weight"].shape == (3 * 32, 32)
    assert sd["output.weight"].shape == (32, 32)
    # torch Linear is [out, in]: wqkv rows are q (heads × head_dim), then k, then v.
    q_head1 = params["transformer"]["layers"]["block"]["attention"]["wqkv"]["kernel"][1][:, 0, 1, :]
    np.testing.assert_array_equal(sd["layers.1.attention.wqkv.weight"][16:32].T, q_head1)
    wrapped = {"model": {"_orig_mod.module." + k: v for k, v in sd.items()}}
    back = from_torch(wrapped, "llamagen_gpt", cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, back)
    # Unscanned layout converts the same state dict to the same numbers.
    unscanned = from_torch(sd, "llamagen_gpt", _tiny(False))
    np.testing.assert_array_equal(unscanned["transformer"]["layers_1"]["ffn_norm"]["weight"],
                                  params["transformer"]["layers"]["block"]["ffn_norm"]["weight"][1])
    missing = dict(sd)
    del missing["layers.0.feed_forward.w2.weight"]
    with pytest.raises(ConversionError, match=r"missing keys: layers\.0\.feed_forward\.w2\.weight"):
        from_torch(missing, "llamagen_gpt", cfg)
    extra = dict(sd, **{"layers.2.ffn_norm.weight": np.ones(32, np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected keys: layers\.2\.ffn_norm\.weight"):
        from_torch(extra, "llamagen_gpt", cfg)
    bad = dict(sd, **{"norm.weight": np.ones(31, np.float32)})
    with pytest.raises(ConversionError, match=r"mis-shaped keys: norm\.weight"):
        from_torch(bad, "llamagen_gpt", cfg)


def _naive_causal(q, k, v):
    """Softmax over keys j <= i in float64, written out independently; q, k, v [B, L, H, Dh]."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", p, v), p


def test_default_attention_matches_naive_attention():
    from iar_jax.models import attention

    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 7, 3, 8)).astype(np.float32) for _ in range(3))
    want, p = _naive_causal(q, k, v)
    np.testing.assert_allclose(np.asarray(attention.causal(q, k, v)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(attention.class_attention(q, k)), p[:, :, -1, 0].mean(1), rtol=1e-5)
    lowered = jax.jit(attention.causal).lower(q, k, v).as_text(debug_info=True)
    assert "attention_dot_product" in lowered
    with pytest.raises(ValueError, match="model.attention='flash' is not one of dot_product|pallas_flash"):
        attention.causal(q, k, v, "flash")
