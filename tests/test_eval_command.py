"""`iar-jax evaluate` end to end on tiny ADM-style npz batches (narrow random Inception weights, so the
numbers are arbitrary: the checks are on the report's structure, FID(x, x) = 0 and the ADM conventions).

Runs pass --sfid=false: sFID's 2023-d float64 sqrtm alone costs about a minute of CPU. The spatial
features are checked in test_eval_inception and the Frechet distance in test_eval_metrics.
"""
import json

import numpy as np
import pytest

from iar_jax import cli
from iar_jax.evaluation import features, inception, metrics

DIV = 16  # same narrow network and batch shape as test_eval_inception: one shared compilation


def _run(args):
    from absl import flags

    flags.FLAGS.unparse_flags()  # flags persist across in-process runs; start from the defaults
    with pytest.raises(SystemExit) as e:
        cli.main(["iar-jax", "evaluate", "--progress=false", "--batch_size=50"] + args)
    assert e.value.code in (0, None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    flat = inception.random_flat_params(0, with_logits=True, channel_divisor=DIV)
    np.savez(d / "w.npz", **flat)
    # 160 > 128 feature dims, so the covariances are full rank; two different image distributions.
    a = rng.integers(0, 256, (160, 64, 64, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) // 2 + rng.integers(0, 64, a.shape), 0, 255).astype(np.uint8)
    np.savez(d / "a.npz", arr_0=a)
    np.savez_compressed(d / "b.npz", arr_0=b, arr_1=np.arange(160) % 10)
    return d


def test_evaluate_inception_report(files):
    out = files / "r.json"
    _run([f"--samples={files / 'b.npz'}", f"--ref={files / 'a.npz'}", f"--weights={files / 'w.npz'}",
          f"--out={out}", "--kid", "--sfid=false"])
    r = json.loads(out.read_text())
    for k in ("fid", "inception_score", "precision", "recall", "kid"):
        assert isinstance(r[k], float), k
    assert r["sfid"] is None and "sfid" in r["notes"]
    assert r["num_samples"] == 160 and r["num_ref_images"] == 160 and r["fid"] > 0
    assert 1.0 <= r["inception_score"] <= inception.NUM_CLASSES



def test_reference_statistics_take_precedence(files):
    # An ADM reference batch holding only mu/sigma (of the very same images): FID uses them -> 0;
    # precision / recall need reference images, so they are reported unavailable.
    flat = dict(np.load(files / "w.npz"))
    fn = features.inception_feature_fn(True, channel_divisor=DIV)
    ext = features.FeatureExtractor(fn, inception.params_from_flat(flat), batch_size=50)
    feats = ext(features.iter_npz_batches(str(files / "a.npz")), progress=False)
    st = metrics.GaussianStats.from_features(feats["pool"])
    np.savez(files / "ref_stats.npz", mu=st.mu, sigma=st.sigma)
    out = files / "s.json"
    _run([f"--samples={files / 'a.npz'}", f"--ref={files / 'ref_stats.npz'}",
          f"--weights={files / 'w.npz'}", f"--out={out}", "--sfid=false"])
    r = json.loads(out.read_text())
    assert abs(r["fid"]) < 1e-3
    assert r["precision"] is None and "statistics only" in r["notes"]["precision_recall"]


def test_evaluate_small_cnn_accuracy(files):
    from iar_jax.evaluation import small_cnn

    x, y = small_cnn.load_fashion_mnist("test")
    np.savez(files / "fm_s.npz", arr_0=x[:1000], arr_1=y[:1000])
    np.savez(files / "fm_r.npz", arr_0=x[1000:4000])
    out = files / "fm.json"
    _run(["--feature=small_cnn", f"--samples={files / 'fm_s.npz'}", f"--ref={files / 'fm_r.npz'}", f"--out={out}"])
    r = json.loads(out.read_text())
    assert r["class_accuracy"] >= 0.85  # the shipped classifier on real test images
    assert r["fid"] < 3 and r["precision"] > 0.8 and r["recall"] > 0.8  # 1000 vs 3000 real images


def test_bad_inputs_are_one_line_errors(files):
    np.savez(files / "chw.npz", arr_0=np.zeros((4, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="NHWC"):
        from iar_jax.commands.evaluate import evaluate_inception

        evaluate_inception(str(files / "chw.npz"), str(files / "a.npz"), str(files / "w.npz"), progress=False)
    with pytest.raises(ValueError, match="arr_0"):
        list(features.iter_npz_batches(str(files / "ref_stats.npz") if (files / "ref_stats.npz").exists()
                                       else str(files / "w.npz")))


def test_existing_report_is_kept_without_overwrite(files):
    from absl import flags

    from iar_jax.evaluation import small_cnn

    x, y = small_cnn.load_fashion_mnist("test")
    np.savez(files / "ow.npz", arr_0=x[:200], arr_1=y[:200])
    report = files / "ow.metrics.json"  # the default --out
    report.write_text('{"fid": "an earlier report"}')
    flags.FLAGS.unparse_flags()
    with pytest.raises(SystemExit) as e:  # refused before any feature extraction
        cli.main(["iar-jax", "evaluate", "--feature=small_cnn", f"--samples={files / 'ow.npz'}",
                  f"--ref={files / 'ow.npz'}"])
    assert "ow.metrics.json already exists; pass --overwrite" in str(e.value.code)
    assert report.read_text() == '{"fid": "an earlier report"}'
    _run(["--feature=small_cnn", f"--samples={files / 'ow.npz'}", f"--ref={files / 'ow.npz'}", "--overwrite"])
    assert json.loads(report.read_text())["num_samples"] == 200
