"""Helpers shared by the benchmark scripts: device peak FLOP/s, JSON last line."""
import json
import os
import sys

# Dense bf16 peak FLOP/s per chip (fp32 on CPU is measured, not looked up).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def device_peak_flops(device):
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_FLOPS.items():
        if kind.startswith(name):
            return peak
    return None


def add_repo_to_path():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    return root


def huge_pages() -> bool:
    """Whether glibc's malloc was started with 2 MiB pages (see the README's CPU notes)."""
    return "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "").split(":")


def emit(result: dict) -> None:
    print(json.dumps(result, sort_keys=True))
