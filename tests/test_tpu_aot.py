"""The tiny configs' train step and sampler compiled by XLA's TPU compiler (libtpu) for a v5e:2x2
slice from this CPU host: they fit, run the accelerator attention path, and pick the accelerator
kernels although the host backend is the CPU."""
import importlib.util
import os

import numpy as np
import pytest

from iar_jax import aot, runtime
from iar_jax.config_lib import load_config

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]'); the TPU compiler is absent")


@pytest.fixture(scope="module")
def v5e_2x2():
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return aot.tpu_devices("v5e:2x2")


@needs_libtpu
@pytest.mark.slow  # TPU compiles: these and the Pallas one take ~2.5 min on 2 CPU cores
@pytest.mark.parametrize("family", ["iar", "iar2"])
@pytest.mark.parametrize("what", ["train", "sample"])
def test_tiny_programs_compile_for_v5e_and_fit(v5e_2x2, family, what):
    config = load_config(f"configs/{family}.py:tiny")
    assert config.model.kernels == "auto"
    r = aot.prove(config, "v5e:2x2", what, v5e_2x2)
    assert r["kernels"] == "xla"  # compiled from this CPU host, with the accelerator kernels
    assert r["device"] == "TPU v5 lite" and r["chips"] == 4 and r["hbm_gib"] == 16
    assert 0 < r["gib_per_chip"] and r["headroom"] >= 0.10
    assert r["attention_kernels"] == ["attention_dot_product"]
    if what == "train":
        # Data parallel over 4 chips: gradients are all-reduced, nothing else moves.
        assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
        assert r["collectives"]["all-reduce"]["count"] >= 1
        assert r["collectives"]["all-to-all"]["count"] == 0


@needs_libtpu
def test_unknown_topology_is_one_line_error():
    with pytest.raises(ValueError, match=r"cannot describe TPU topology 'v5e:1x3'.*v5e:2x2"):
        aot.tpu_devices("v5e:1x3")


def test_resolve_kernels_follows_the_target_devices():
    class Dev:
        def __init__(self, platform):
            self.platform = platform

    for devices, want in (([Dev("cpu")] * 2, "xla_cpu"), ([Dev("tpu")] * 4, "xla"), ([Dev("gpu")], "xla")):
        c = load_config("configs/iar.py:tiny")
        assert runtime.resolve_kernels(c, devices).model.kernels == want
    c = load_config("configs/iar.py:tiny", **{"model.kernels": "xla"})
    assert runtime.resolve_kernels(c, [Dev("cpu")]).model.kernels == "xla"  # an explicit choice stays


def test_collective_inventory_of_hand_written_hlo():
    hlo = """
  %all-gather-start.1 = (bf16[4,768]{1,0}, bf16[16,768]{1,0}) all-gather-start(bf16[4,768]{1,0} %p), dimensions={0}
  %all-gather-done.1 = bf16[16,768]{1,0} all-gather-done(%all-gather-start.1)
  %reduce-scatter.2 = f32[4,768]{1,0} reduce-scatter(f32[16,768]{1,0} %g), dimensions={0}
  %all-reduce.3 = f32[] all-reduce(f32[] %l), to_apply=%add
  %fusion.4 = f32[8]{0} fusion(f32[8]{0} %x), kind=kLoop, calls=%all-reduce-like
"""
    inv = aot.collectives(hlo)
    assert inv["all-gather"] == {"count": 1, "bytes": 16 * 768 * 2}
    assert inv["reduce-scatter"] == {"count": 1, "bytes": 4 * 768 * 4}
    assert inv["all-reduce"] == {"count": 1, "bytes": 4}
    assert inv["all-to-all"]["count"] == inv["collective-permute"]["count"] == 0
    assert np.isclose(aot.hbm_bytes(type("D", (), {"device_kind": "TPU v5p"})()), 95 * 2 ** 30)


@needs_libtpu
@pytest.mark.slow
def test_pallas_flash_attention_lowers_for_tpu(v5e_2x2):
    """model.attention=pallas_flash: the train step runs the Pallas TPU kernel (a TPU custom call),
    forward and gradient, per shard; 16x16 tokens make the 256-long sequence the kernel's blocks tile."""
    config = load_config("configs/iar.py:tiny,grid=16", **{"model.attention": "pallas_flash"})
    r = aot.prove(config, "v5e:2x2", "train", v5e_2x2)
    assert "attention_pallas_flash" in r["attention_kernels"] and "tpu_custom_call" in r["attention_kernels"]
    assert r["headroom"] >= 0.10
