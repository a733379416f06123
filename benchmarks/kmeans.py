"""Codebook rearrangement speed and quality on a random L2-normalised codebook (seeded).

    python benchmarks/kmeans.py --codes=16384 --dim=8 --cluster_size=128 [--compare_greedy]

Times the whole `rearrange_codebook` (balanced k-means + cluster-major nearest-neighbour order):
`seconds_with_compile` is the first call of the process, `seconds` the same call again (compiled).
Like `iar-jax rearrange`, it uses the persistent compile cache (iar_jax.runtime), so from the
second process on `seconds_with_compile` no longer includes XLA compilation.
`--compare_greedy` also runs the reference greedy algorithm (SPEC §3, exact, up to 100
iterations) from the same start and reports its intra-cluster MSE.
Last line: {"seconds", "seconds_with_compile", "intra_mse", "iterations", ...}.
"""
import time

from absl import app, flags

import common

common.add_repo_to_path()

import numpy as np  # noqa: E402

from iar_jax import rearrange as R  # noqa: E402
from iar_jax import runtime  # noqa: E402

flags.DEFINE_integer("codes", 16384, "codebook size N")
flags.DEFINE_integer("dim", 8, "code dimension")
flags.DEFINE_integer("cluster_size", 128, "codes per cluster")
flags.DEFINE_integer("seed", 0, "codebook and k-means seed")
flags.DEFINE_enum("method", "anneal", ["anneal", "greedy"], "balanced k-means method")
flags.DEFINE_bool("compare_greedy", False, "also run the reference greedy algorithm and report its MSE")
FLAGS = flags.FLAGS


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main(_):
    runtime.enable_compilation_cache()
    x = np.random.default_rng(FLAGS.seed).standard_normal((FLAGS.codes, FLAGS.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = R.KMeansConfig(cluster_size=FLAGS.cluster_size, method=FLAGS.method, seed=FLAGS.seed)
    r, first, _ = timed(lambda: R.rearrange_codebook(x, cfg))
    r, warm, warm_cpu = timed(lambda: R.rearrange_codebook(x, cfg))
    assert np.all(np.bincount(r.assignment) == FLAGS.cluster_size)
    out = {"seconds": round(warm, 3), "cpu_seconds": round(warm_cpu, 3), "seconds_with_compile": round(first, 3),
           "intra_mse": round(r.intra_mse, 7), "iterations": r.iterations, "method": FLAGS.method,
           "codes": FLAGS.codes, "dim": FLAGS.dim, "cluster_size": FLAGS.cluster_size}
    print(f"rearrangement: {warm:.3f} s compiled ({warm_cpu:.3f} s CPU), {first:.3f} s with compile; "
          f"intra-cluster MSE {r.intra_mse:.6f} after {r.iterations} iterations")
    if FLAGS.compare_greedy:
        gcfg = R.KMeansConfig(cluster_size=FLAGS.cluster_size, method="greedy", seed=FLAGS.seed)
        (a, it), gsec, _ = timed(lambda: R.balanced_kmeans(x, gcfg))
        g = R.intra_cluster_mse(x, a)
        print(f"reference greedy: MSE {g:.6f} after {it} iterations ({gsec:.1f} s with compile)")
        out.update(greedy_intra_mse=round(g, 7), greedy_iterations=it, greedy_seconds=round(gsec, 3),
                   mse_vs_greedy=round(r.intra_mse / g - 1, 5))
    common.emit(out)


if __name__ == "__main__":
    app.run(main)
