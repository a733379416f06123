"""Transparent huge pages for glibc's malloc, set by re-executing the process once.

XLA:CPU allocates a step's large buffers afresh on every call (glibc serves them with mmap), so
each step pays a page fault per 4 KiB it touches: about 7% of an IAR-B train step on a 2-core CPU
(benchmarks/train_step.py). With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` glibc asks the kernel for
2 MiB pages instead (where /sys/kernel/mm/transparent_hugepage allows them; child processes
inherit it). glibc reads its tunables only at process start, hence the re-exec.
"""
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
_DONE = "IAR_JAX_HUGE_PAGES_REEXECED"


def enabled() -> bool:
    return f"{TUNABLE}=1" in os.environ.get("GLIBC_TUNABLES", "").split(":")


def reexec_with_huge_pages() -> None:
    """Re-run this process (same interpreter, same command line) with the huge-page tunable, unless
    it is already set (to any value), IAR_JAX_HUGE_PAGES=0 opts out, this is not Linux/glibc, or
    this process is the re-exec. Call it first thing in an entry point, never from library code:
    it replaces the running process."""
    if os.environ.get("IAR_JAX_HUGE_PAGES", "1").lower() in ("0", "false", "no") or os.environ.get(_DONE):
        return
    current = os.environ.get("GLIBC_TUNABLES", "")
    if (TUNABLE in current or not sys.platform.startswith("linux") or not sys.executable
            or platform.libc_ver()[0] != "glibc"):
        return
    os.environ["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"
    os.environ[_DONE] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
