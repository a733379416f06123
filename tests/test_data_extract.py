"""Code extraction (resumable after a real kill, multi-host shards, both record formats, errors),
the records reader, and the training input over it (deterministic, resumable, per-host)."""
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from iar_jax.data import datasets, extract, preprocess, records

SIZE, VOCAB, F = 16, 50, 4  # 16 px images, 4x4 grid from 4x4 patches
GRID = (SIZE // F, SIZE // F)


def stub_encode(images):
    """Deterministic stand-in for a tokenizer: quantised mean of channel 0 per FxF patch."""
    b = images.shape[0]
    means = images[..., 0].reshape(b, SIZE // F, F, SIZE // F, F).mean((2, 4))
    return np.clip(np.floor((means + 1) / 2 * VOCAB), 0, VOCAB - 1).astype(np.int64)


def stub_encode_dual(images):
    return stub_encode(images), (stub_encode(images) * 7 + 3) % 11


def small_dataset(n=30):
    full = datasets.fashion_mnist_embedded("test")
    return datasets.ArrayDataset(full.images[:n], full.labels[:n], 10, "fmnist-test-head")


CFG = extract.ExtractConfig(image_size=SIZE, batch_size=3, records_per_shard=8, num_workers=2)


def expected_codes(ds, cfg=CFG):
    """What extraction must write, computed image by image without the pipeline."""
    codes = [stub_encode(preprocess.to_model_range(
        preprocess.augmented_views(ds[i][0], SIZE, cfg.crop_range, cfg.ten_crop, cfg.small))).reshape(cfg.num_aug, -1)
        for i in range(len(ds))]
    return np.stack(codes), ds.labels


@pytest.mark.parametrize("fmt", ["array_record", "npy"])
def test_extract_and_read_back(tmp_path, fmt):
    ds = small_dataset()
    cfg = extract.ExtractConfig(**{**CFG.__dict__, "format": fmt})
    meta = extract.extract(ds, stub_encode, str(tmp_path), cfg, grid=GRID, vocab=[VOCAB], fingerprint="abc",
                           process_index=0, process_count=1, progress=False)
    assert meta["format"] == fmt and meta["num_shards"] == 4 and meta["num_aug"] == 10
    src = records.open_source(str(tmp_path), fingerprint="abc", num_classes=10, vocab=VOCAB, grid=GRID[0])
    want_codes, want_labels = expected_codes(ds)
    got = src.get(np.arange(len(ds)))
    np.testing.assert_array_equal(got["codes"], want_codes)
    np.testing.assert_array_equal(got["labels"], want_labels)
    idx, aug = np.array([29, 0, 17, 8]), np.array([9, 3, 0, 5])
    np.testing.assert_array_equal(src.get(idx, aug)["codes"], want_codes[idx, aug])
    assert src[17]["labels"] == want_labels[17]
    with pytest.raises(ValueError, match="tokenizer"):
        records.open_source(str(tmp_path), fingerprint="other")
    with pytest.raises(ValueError, match="num_classes"):
        records.open_source(str(tmp_path), num_classes=5)


def test_dual_codes_and_two_hosts(tmp_path):
    ds = small_dataset(20)
    cfg = extract.ExtractConfig(**{**CFG.__dict__, "ten_crop": False})
    for host in (1, 0):  # hosts write disjoint shards into one directory
        extract.extract(ds, stub_encode_dual, str(tmp_path), cfg, grid=GRID, vocab=[VOCAB, 11], fingerprint="f",
                        process_index=host, process_count=2, progress=False)
        if host == 1:
            with pytest.raises(ValueError, match="incomplete: 2 of 3 shards"):
                records.open_source(str(tmp_path))
    got = records.open_source(str(tmp_path)).get(np.arange(20))
    views = [preprocess.to_model_range(preprocess.augmented_views(ds[i][0], SIZE, ten_crop_views=False))
             for i in range(20)]
    np.testing.assert_array_equal(got["codes"], np.stack([stub_encode(v).reshape(2, -1) for v in views]))
    np.testing.assert_array_equal(got["detail_codes"], np.stack([stub_encode_dual(v)[1].reshape(2, -1) for v in views]))


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import test_data_extract as t
    from iar_jax.data import extract
    calls = [0]
    def encode(x):
        calls[0] += 1
        if calls[0] == 7:  # mid-way through shard 2 (3 images per call, 8 per shard)
            os.kill(os.getpid(), signal.SIGKILL)
        return t.stub_encode(x)
    extract.extract(t.small_dataset(), encode, {out!r}, t.CFG, grid=t.GRID, vocab=[t.VOCAB], fingerprint="abc",
                    process_index=0, process_count=1, progress=False)
""")


def test_resume_after_kill(tmp_path):
    out = str(tmp_path / "codes")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.path.dirname(tests) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN.format(tests=tests, out=out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    done = sorted(n for n in os.listdir(out) if n.startswith("shard-") and ".tmp-" not in n)
    assert done == ["shard-00000.array_record", "shard-00001.array_record"]
    open(os.path.join(out, "shard-00002.array_record.tmp-99999"), "wb").write(b"partial")  # a torn write
    calls = []
    extract.extract(small_dataset(), lambda x: calls.append(len(x)) or stub_encode(x), out, CFG, grid=GRID,
                    vocab=[VOCAB], fingerprint="abc", process_index=0, process_count=1, progress=False)
    assert calls == [3 * 10] * 5  # only shards 2 and 3 again: ceil(8/3) + ceil(6/3) padded batches
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    got = records.open_source(out).get(np.arange(30))
    want_codes, want_labels = expected_codes(small_dataset())
    np.testing.assert_array_equal(got["codes"], want_codes)
    np.testing.assert_array_equal(got["labels"], want_labels)
    with pytest.raises(ValueError, match="other settings .*tokenizer_fingerprint"):
        extract.extract(small_dataset(), stub_encode, out, CFG, grid=GRID, vocab=[VOCAB], fingerprint="xyz",
                        process_index=0, process_count=1, progress=False)


def test_extract_errors(tmp_path):
    ds = small_dataset(4)
    bad_grid = lambda x: stub_encode(x)[:, :2]  # noqa: E731
    with pytest.raises(ValueError, match="grid does not match"):
        extract.extract(ds, bad_grid, str(tmp_path / "a"), CFG, grid=GRID, vocab=[VOCAB], fingerprint="f",
                        process_index=0, process_count=1, progress=False)
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        extract.extract(ds, stub_encode, str(tmp_path / "b"), CFG, grid=GRID, vocab=[10], fingerprint="f",
                        process_index=0, process_count=1, progress=False)
    with pytest.raises(ValueError, match="no extracted codes"):
        records.open_source(str(tmp_path / "nothing"))


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("loader"))
    extract.extract(small_dataset(), stub_encode, out, CFG, grid=GRID, vocab=[VOCAB], fingerprint="abc",
                    process_index=0, process_count=1, progress=False)
    return out


@pytest.mark.parametrize("loader", ["numpy", "grain"])
def test_loader_deterministic_and_resumable(record_dir, loader):
    from iar_jax.data import codes

    make = codes.BatchIterator if loader == "numpy" else functools.partial(codes.GrainBatchIterator, num_threads=2)

    src = records.open_source(record_dir)
    all_codes = src.get(np.arange(30))["codes"]  # [30, 10, T]

    def take(it, k):
        return [next(it) for _ in range(k)]

    run = take(make(src, 6, seed=3), 12)  # 2.4 epochs
    again = take(make(src, 6, seed=3), 12)
    for a, b in zip(run, again):
        np.testing.assert_array_equal(a["codes"], b["codes"])
    other = take(make(src, 6, seed=4), 5)
    assert any(not np.array_equal(a["codes"], b["codes"]) for a, b in zip(run, other))
    # Each epoch (5 batches of 6) shows every image once, as one of its 10 views.
    for e in range(2):
        codes = np.concatenate([b["codes"] for b in run[5 * e:5 * e + 5]])
        labels = np.concatenate([b["labels"] for b in run[5 * e:5 * e + 5]])
        matches = [np.flatnonzero((all_codes == c[None, None]).all(-1).any(1)) for c in codes]
        assert sorted(set(np.concatenate(matches))) == list(range(30))
        assert np.array_equal(np.sort(labels), np.sort(src.get(np.arange(30))["labels"]))
    # Resume mid-epoch from the saved position.
    it = make(src, 6, seed=3)
    take(it, 7)
    state = json.loads(json.dumps(it.state()))
    resumed = make(src, 6, seed=3)
    resumed.restore(state)
    for a, b in zip(take(resumed, 5), run[7:12]):
        np.testing.assert_array_equal(a["codes"], b["codes"])
    # Two hosts each read half of every global batch.
    h0, h1 = make(src, 6, 3, 0, 2), make(src, 6, 3, 1, 2)
    for b in run[:4]:
        np.testing.assert_array_equal(np.concatenate([next(h0)["codes"], next(h1)["codes"]]), b["codes"])
