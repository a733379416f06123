"""Test setup: 8 simulated CPU devices (set before jax is imported), fp32, shared tiny configs."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# With libtpu installed (the [tpu] extra), every jax process would spend ~12 s probing for a TPU;
# the TPU programs are compiled from topology descriptions, which work with the CPU platform.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Commands enable a persistent compile cache; keep tests hermetic (fresh per session, shared by the
# subprocess tests, never the user's ~/.cache).
import tempfile  # noqa: E402

os.environ.setdefault("IAR_JAX_COMPILATION_CACHE", tempfile.mkdtemp(prefix="iar_jax_xla_"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root():
    return REPO


def tiny_iar_config(**overrides):
    from iar_jax.config_lib import load_config

    return load_config(os.path.join(REPO, "configs/iar.py:tiny"), **overrides)
