"""`iar-jax rearrange` and `iar-jax extract_codes` end to end on a tiny random tokenizer."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device is enough
    return subprocess.run([sys.executable, "-m", "iar_jax.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_rearrange_then_extract(tmp_path):
    from iar_jax.checkpointing import Checkpointer
    from iar_jax.data import extract, records
    from iar_jax.data.extract import tokenizer_fingerprint
    from iar_jax.tokenizer import VQConfig, abstract_params
    from iar_jax.tokenizer.checkpoint import load_tokenizer
    from iar_jax.tokenizer.config import model_meta

    cfg = VQConfig(codebook_size=64, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=16, ch=8,
                   num_res_blocks=1, norm_groups=4)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(np.float32) * 0.2,
                                    abstract_params(cfg))
    tok = str(tmp_path / "tok")
    ckpt = Checkpointer(os.path.join(tok, "checkpoints"), async_save=False)
    ckpt.save(0, {"params": params}, {}, {"kind": "tokenizer_train_state", "model_family": "tokenizer",
                                          "model": model_meta(cfg)}, force=True)
    ckpt.close()

    out = str(tmp_path / "re")
    p = run_cli("rearrange", f"--tokenizer={tok}", "--cluster_size=16", f"--out={out}")
    assert p.returncode == 0, p.stderr[-2000:]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    mapping, new_order = np.load(os.path.join(out, "mapping.npy")), np.load(os.path.join(out, "new_order.npy"))
    np.testing.assert_array_equal(mapping[new_order], np.arange(64))
    assert np.all(np.bincount(mapping // 16) == 16) and info["intra_mse"] > 0
    cfg2, params2 = load_tokenizer(os.path.join(out, "tokenizer"))
    assert cfg2 == cfg
    np.testing.assert_array_equal(params2["quantize"]["embedding"], params["quantize"]["embedding"][new_order])
    assert info["tokenizer_fingerprint"] == tokenizer_fingerprint(params) == tokenizer_fingerprint(params2)

    with pytest.raises(ValueError, match="is a rearranged tokenizer"):
        extract.refuse_rearranged(os.path.join(out, "tokenizer"))  # what extract_codes checks first

    images = rng.integers(0, 256, (5, 7, 7)).astype(np.uint8)
    np.savez(tmp_path / "tiny.npz", images=images, labels=np.array([0, 1, 2, 1, 0]))
    codes = str(tmp_path / "codes")
    p = run_cli("extract_codes", f"--tokenizer={tok}", "--dataset=npz", f"--data_path={tmp_path / 'tiny.npz'}",
                "--image_size=8", f"--out={codes}", "--records_per_shard=2", "--batch_size=2", "--num_workers=1")
    assert p.returncode == 0, p.stderr[-2000:]
    src = records.open_source(codes, fingerprint=tokenizer_fingerprint(params), num_classes=3, vocab=64, grid=4)
    got = src.get(np.arange(5))
    assert got["codes"].shape == (5, 10, 16) and got["codes"].max() < 64
    np.testing.assert_array_equal(got["labels"], [0, 1, 2, 1, 0])
    assert len({tuple(v) for v in got["codes"][0]}) > 1  # the ten views differ
