"""The XLA:CPU programs of `model.kernels="xla_cpu"` against NumPy formulas, naive attention and
the default model path."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iar_jax.models import cpu_kernels, gpt


@pytest.mark.parametrize("x_shape,w_shape", [((2, 5, 3), (3, 7)),  # in <= out: transposes x
                                             ((2, 5, 6), (6, 4)),  # in > out: transposes g
                                             ((2, 5, 3, 4), (3, 4, 6))])  # two contracted axes (wo)
def test_cpu_dot_general_value_and_grads_by_hand(x_shape, w_shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    k = len(w_shape) - 1
    dims = ((tuple(range(x.ndim - k, x.ndim)), tuple(range(k))), ((), ()))
    c = rng.standard_normal(x_shape[:x.ndim - k] + w_shape[k:]).astype(np.float32)
    loss = lambda x, w: jnp.sum(c * cpu_kernels.cpu_dot_general(x, w, dims))
    y = cpu_kernels.cpu_dot_general(jnp.asarray(x), jnp.asarray(w), dims)
    dx, dw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    x2 = x.reshape(-1, int(np.prod(w_shape[:k]))).astype(np.float64)
    w2 = w.reshape(x2.shape[1], -1).astype(np.float64)
    g2 = c.reshape(x2.shape[0], -1).astype(np.float64)
    np.testing.assert_allclose(np.asarray(y).reshape(g2.shape), x2 @ w2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx).reshape(x2.shape), g2 @ w2.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw).reshape(w2.shape), x2.T @ g2, rtol=1e-5, atol=1e-5)


def test_cpu_dot_general_passes_batched_contractions_through():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 3, 4)).astype(np.float32)
    b = rng.standard_normal((2, 4, 5)).astype(np.float32)
    dims = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_allclose(np.asarray(cpu_kernels.cpu_dot_general(a, b, dims)), np.einsum("bij,bjk->bik", a, b),
                               rtol=1e-5, atol=1e-5)


def test_causal_attention_value_and_grads_match_naive_attention():
    rng = np.random.default_rng(2)
    q, k, v, c = (jnp.asarray(rng.standard_normal((2, 3, 5, 4)).astype(np.float32)) for _ in range(4))

    def naive(q, k, v):  # softmax over keys j <= i, written out independently
        s = jnp.einsum("bhid,bhjd->bhij", q, k) / 2.0
        s = jnp.where(np.tril(np.ones((5, 5), bool)), s, -jnp.inf)
        e = jnp.exp(s - s.max(-1, keepdims=True))
        return jnp.einsum("bhij,bhjd->bhid", e / e.sum(-1, keepdims=True), v)

    got = jax.value_and_grad(lambda *a: jnp.sum(c * cpu_kernels.causal_attention(*a)), argnums=(0, 1, 2))(q, k, v)
    want = jax.value_and_grad(lambda *a: jnp.sum(c * naive(*a)), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_cpu_kernels_match_the_default_model():
    """kernels="xla_cpu" (Dense VJPs, causal attention) changes the program, not the logits or the
    parameter gradients of the whole model (scanned, rematerialised layers)."""
    base = gpt.GPTConfig(vocab_size=32, num_classes=5, dim=32, n_layer=2, n_head=2, grid_size=3, remat="dots")
    codes = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 32)
    labels = jnp.array([4, 0])
    c = jax.random.normal(jax.random.PRNGKey(2), (2, 9, base.vocab_size))
    params = gpt.GPT(base).init(jax.random.PRNGKey(0), codes, labels)["params"]
    out = {}
    for kernels in ("xla", "xla_cpu"):
        model = gpt.GPT(dataclasses.replace(base, kernels=kernels))
        loss = lambda p: jnp.sum(c * model.apply({"params": p}, codes, labels))  # noqa: E731
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        assert ("optimization_barrier" in jaxpr) == (kernels == "xla_cpu")  # only the CPU Dense VJP has barriers
        out[kernels] = jax.value_and_grad(loss)(params)
    for g, w in zip(jax.tree_util.tree_leaves(out["xla_cpu"]), jax.tree_util.tree_leaves(out["xla"])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
