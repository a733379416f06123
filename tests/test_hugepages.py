"""The huge-page re-exec of the CLI and benchmarks: runs once, keeps other tunables, can be turned off."""
import os
import platform
import subprocess
import sys

import pytest

from iar_jax import hugepages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc tunables exist only on Linux/glibc")

_PROBE = ("import os; print('started', flush=True); from iar_jax.hugepages import reexec_with_huge_pages; "
          "reexec_with_huge_pages(); from iar_jax.hugepages import enabled; "
          "print('tunables', os.environ.get('GLIBC_TUNABLES'), enabled())")


def _run(**env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_TUNABLES", "IAR_JAX_HUGE_PAGES"))}
    full.update(env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(hugepages.__file__)))
    full["PYTHONPATH"] = root + os.pathsep + full.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=full, capture_output=True, text=True, check=True)
    return out.stdout.split("\n")


def test_reexecs_once_with_the_tunable():
    lines = _run()
    # The first run prints 'started' and re-execs; the second sees the tunable and goes on.
    assert lines.count("started") == 2
    assert "tunables glibc.malloc.hugetlb=1 True" in lines


def test_keeps_other_tunables_and_respects_opt_out():
    assert "tunables glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1 True" in _run(GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    lines = _run(IAR_JAX_HUGE_PAGES="0")
    assert lines.count("started") == 1 and "tunables None False" in lines
    lines = _run(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")  # the user's own setting wins
    assert lines.count("started") == 1 and "tunables glibc.malloc.hugetlb=0 False" in lines
