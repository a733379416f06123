"""`iar-jax convert` end to end: torch file -> Flax params dir -> torch file, exact."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from iar_jax.config_lib import load_config
from iar_jax.models.families import get_family
from iar_jax.models import gpt

torch = pytest.importorskip("torch")  # the torch-free round trip is in test_gpt.py
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "iar_jax.cli", "convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_convert_cli_round_trip(tmp_path):
    cfg = load_config("configs/iar.py:tiny")
    _, model_cfg = get_family("iar").build(cfg)
    rng = np.random.default_rng(0)
    from iar_jax.convert import to_torch

    params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), gpt.abstract_params(model_cfg))
    sd = {k: torch.from_numpy(v) for k, v in to_torch(params, "llamagen_gpt", model_cfg).items()}
    torch.save({"model": sd}, tmp_path / "in.pt")
    r = _cli("--kind=llamagen_gpt", "--config=configs/iar.py:tiny", f"--torch={tmp_path / 'in.pt'}", f"--out={tmp_path / 'flax'}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli("--kind=llamagen_gpt", "--config=configs/iar.py:tiny", f"--params={tmp_path / 'flax'}",
             f"--to_torch={tmp_path / 'out.pt'}")
    assert r.returncode == 0, r.stderr[-3000:]
    back = torch.load(tmp_path / "out.pt")
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # A state dict missing a key is refused with its name, and --out is never overwritten.
    del sd["norm.weight"]
    torch.save(sd, tmp_path / "bad.pt")
    r = _cli("--kind=llamagen_gpt", "--config=configs/iar.py:tiny", f"--torch={tmp_path / 'bad.pt'}", f"--out={tmp_path / 'x'}")
    assert r.returncode != 0 and "missing keys: norm.weight" in r.stderr


def test_convert_inception_weights_to_npz(tmp_path):
    from iar_jax.evaluation import inception
    from tests.test_eval_weights import DIV, _pytorch_fid_state_dict

    flat = inception.random_flat_params(2, with_logits=True, channel_divisor=DIV)
    flat["softmax/biases"] = np.linspace(-1, 1, inception.NUM_CLASSES, dtype=np.float32)
    sd = _pytorch_fid_state_dict(torch, flat)
    torch.save(sd, tmp_path / "pt_inception.pth")
    args = ("--kind=inception", f"--from={tmp_path / 'pt_inception.pth'}", f"--to={tmp_path / 'w.npz'}")
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(tmp_path / "w.npz") as z:
        assert sorted(z.files) == sorted(flat)
        np.testing.assert_array_equal(z["mixed_9/tower/mixed/conv/conv2d_params"],
                                      sd["Mixed_7b.branch3x3_2a.conv.weight"].permute(2, 3, 1, 0).numpy())
        np.testing.assert_array_equal(z["softmax/weights"], sd["fc.weight"].T.numpy())
    # The output is never overwritten.
    r = _cli(*args)
    assert r.returncode != 0 and "w.npz exists; choose a new file" in r.stderr
