"""Codebook rearrangement (SPEC §3): balanced k-means vs a slow NumPy transcription of the
reference greedy algorithm, the cluster-major order, mapping invariants, reordered decoding."""
import numpy as np
import pytest

import jax

from iar_jax import rearrange as R


# ------------------------------------------------------------------------------------------------
# Slow NumPy transcriptions of the reference (`balance_k_means.py`), written independently.


def greedy_assign_np(d, m):
    """Visit codes by ascending nearest-centroid distance; each takes its nearest centroid with room."""
    n_codes, n = d.shape
    sizes = np.zeros(n, int)
    out = np.full(n_codes, -1)
    for i in np.argsort(d.min(1), kind="stable"):
        for j in np.argsort(d[i], kind="stable"):
            if sizes[j] < m:
                sizes[j] += 1
                out[i] = j
                break
    return out


def greedy_kmeans_np(x, m, init_idx, max_iter=100):
    c = x[init_idx]
    for _ in range(max_iter):
        d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        a = greedy_assign_np(d, m)
        new = np.stack([x[a == j].mean(0) for j in range(len(c))])
        done = np.allclose(c, new)
        c = new
        if done:
            break
    return a


def mse_np(x, a):
    cent = np.stack([x[a == j].mean(0) for j in range(a.max() + 1)])
    return float(np.mean((x - cent[a]) ** 2))


def chain_np(v):
    """Reference in-cluster order: start at the member nearest the mean (slot m/2-1), its nearest
    neighbour at m/2, then grow the left end and the right end in turn."""
    m = len(v)
    d = ((v[:, None] - v[None]) ** 2).sum(-1)
    order = np.zeros(m, int)
    visited = np.zeros(m, bool)

    def nearest(cur):
        rest = np.where(~visited)[0]
        return rest[np.argmin(d[cur, rest])]

    start = np.argmin(np.linalg.norm(v - v.mean(0), axis=1))
    order[m // 2 - 1], visited[start] = start, True
    nxt = nearest(start)
    order[m // 2], visited[nxt] = nxt, True
    for ii in range(m // 2 - 1):
        nxt = nearest(order[m // 2 - 1 - ii])
        order[m // 2 - 2 - ii], visited[nxt] = nxt, True
        nxt = nearest(order[m // 2 + ii])
        order[m // 2 + ii + 1], visited[nxt] = nxt, True
    return order


def unit_codebook(n, dim, seed):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,m,ties", [((256, 16), 16, False), ((90, 9), 10, True)])
def test_greedy_assignment_equals_reference(shape, m, ties):
    d = np.random.default_rng(1).random(shape).astype(np.float32)
    if ties:  # equal distances everywhere: order must follow the stable sorts of the reference
        d = np.round(d * 3) / 3
    a = np.asarray(R.greedy_capacity_assign(d, m))
    np.testing.assert_array_equal(a, greedy_assign_np(d, m))


N, M, SEEDS = 256, 16, (0, 1, 2)


@pytest.fixture(scope="module")
def codebooks():
    return [unit_codebook(N, 8, s) for s in SEEDS]


@pytest.fixture(scope="module")
def results(codebooks):
    return [R.rearrange_codebook(x * (1 + s), R.KMeansConfig(cluster_size=M, seed=s))  # scale: normalised inside
            for s, x in zip(SEEDS, codebooks)]


def test_balanced_and_permutation(results):
    for r in results:
        assert np.all(np.bincount(r.assignment, minlength=N // M) == M)
        assert sorted(r.new_order.tolist()) == list(range(N))
        np.testing.assert_array_equal(r.mapping[r.new_order], np.arange(N))
        # new ids are cluster-major: new id // M is the code's cluster (clusters in id order).
        np.testing.assert_array_equal(r.mapping // M, r.assignment)


def test_mse_no_worse_than_reference_greedy(codebooks, results):
    for s, x, r in zip(SEEDS, codebooks, results):
        init = R.initial_centroids(N, N // M, s)  # same start
        greedy = mse_np(x.astype(np.float64), greedy_kmeans_np(x.astype(np.float64), M, init))
        ours = mse_np(x.astype(np.float64), r.assignment)
        assert abs(r.intra_mse - ours) < 1e-6
        assert ours <= greedy, (s, ours, greedy)


def test_greedy_method_reproduces_reference(codebooks):
    x = codebooks[0]
    a, iterations = R.balanced_kmeans(x, R.KMeansConfig(cluster_size=M, method="greedy", seed=0))
    init = R.initial_centroids(N, N // M, 0)
    np.testing.assert_array_equal(a, greedy_kmeans_np(x.astype(np.float64), M, init))
    assert 1 <= iterations <= 100


def test_in_cluster_order_is_reference_chain(codebooks, results):
    x, r = codebooks[0], results[0]
    for j in range(N // M):
        members = np.flatnonzero(r.assignment == j)  # ascending old id = the reference's stable sort
        np.testing.assert_array_equal(r.new_order[j * M:(j + 1) * M], members[chain_np(x[members])])
    plain = R.cluster_order(x, r.assignment, M, nn_chain=False)
    np.testing.assert_array_equal(plain, np.argsort(r.assignment, kind="stable"))


def test_reordered_codebook_and_decoding():
    from iar_jax.tokenizer import VQConfig, VQModel, abstract_params, build_model

    cfg = VQConfig(codebook_size=N, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=16, ch=8,
                   num_res_blocks=1, norm_groups=4)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(np.float32) * 0.2,
                                    abstract_params(cfg))
    r = R.rearrange_codebook(params["quantize"]["embedding"], R.KMeansConfig(cluster_size=M))
    new_params = R.reorder_params(params, r.new_order)
    np.testing.assert_array_equal(new_params["quantize"]["embedding"], params["quantize"]["embedding"][r.new_order])
    np.testing.assert_array_equal(r.codebook, params["quantize"]["embedding"][r.new_order])
    model = build_model(cfg)
    decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=VQModel.decode))
    codes = rng.integers(0, N, (2, 2, 2))
    np.testing.assert_array_equal(np.asarray(decode(params, codes)), np.asarray(decode(new_params, r.mapping[codes])))
    with pytest.raises(ValueError, match="embedding_second"):
        R.reorder_params(params, r.new_order, "embedding_second")


def test_errors():
    with pytest.raises(ValueError, match="not divisible by cluster_size 16"):
        R.rearrange_codebook(np.ones((100, 8)), R.KMeansConfig(cluster_size=16))
    with pytest.raises(ValueError, match="method"):
        R.rearrange_codebook(np.ones((32, 8)), R.KMeansConfig(cluster_size=16, method="lloyd"))
