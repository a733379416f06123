"""Reruns the README's measured figures and rewrites its tables from their JSON lines.

    python benchmarks/readme_figures.py                       # demo (both variants) + every benchmark
    python benchmarks/readme_figures.py --only=demo           # one table
    python benchmarks/readme_figures.py --dry-run             # print the new tables; README untouched
    python benchmarks/readme_figures.py --from_jsonl=runs.jsonl   # rewrite from saved results, no runs

Each generated table in README.md sits between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`
and is entirely this script's output, followed by the date and the machine it ran on. Every run's
JSON result is appended to --jsonl (default benchmarks/readme_figures.jsonl) as
{"table", "key", "result"}, so a table can be rebuilt without rerunning. The demo runs from scratch
in a fresh temporary workdir (then once more, to time the resume); expect one to two hours on the
project's 2-core CPU. Last line of output: one JSON object (what was rewritten).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


class Job(NamedTuple):
    table: str
    key: str  # the row's first cell (the command a reader can rerun)
    cmd: List[str]  # a benchmark script's arguments ([] = the demo, run specially)


def _bench(script, *args):
    return Job("benchmarks", " ".join(["python", f"benchmarks/{script}.py", *args]), [f"benchmarks/{script}.py", *args])


JOBS = [
    Job("demo", "iar", []),
    Job("demo", "iar2", []),
    _bench("train_step", "--config=configs/iar.py:b", "--batch=8", "--steps=3"),
    _bench("train_step", "--config=configs/iar2.py:b", "--batch=8", "--steps=2"),
    _bench("sample_speed", "--config=configs/iar.py:b", "--batch=4", "--cfg=2.0"),
    _bench("sample_speed", "--config=configs/iar2.py:b", "--batch=4", "--cfg=2.0", "--repeats=1"),
    _bench("kmeans", "--codes=16384", "--dim=8", "--cluster_size=128"),
    _bench("restore_memory", "--config=configs/iar.py:l", "--full_state"),
    _bench("extract_speed"),
    _bench("tokenizer_speed", "--config=configs/tokenizer.py:vq16", "--batch=4", "--size=256"),
    _bench("tokenizer_quality"),
    _bench("small_cnn"),
    _bench("eval_speed"),
]


# ----------------------------------------------------------------------------------------------
# JSON result -> table cells


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s} s" if m else f"{seconds:.1f} s"


def demo_row(variant: str, r: Dict) -> List[str]:
    """r: the first run's metrics.json plus `resume_seconds` (the second run's)."""
    return [f"`{variant}`", _duration(r["this_run_seconds"]), _duration(r["resume_seconds"]),
            f"{r['fid']:.1f} (real train images: {r['fid_real_train']:.2f})", f"{100 * r['class_accuracy']:.1f} %"]


def _sample_speed(r):
    runs = r.get("runs", [r])
    secs = [x["seconds"] for x in runs]
    span = f"{min(secs):.1f}" + (f"–{max(secs):.1f}" if len(secs) > 1 else "")
    x = runs[0]
    return (f"{span} s for {x['batch']} images ({x['step_ms']:.0f} ms/step); "
            f"weight-streaming floor {x['floor_s']:.1f} s")


FORMATS: Dict[str, Callable[[Dict], str]] = {
    "train_step": lambda r: (f"{r['step_s']:.1f} s/step, {r['tokens_per_s']:.0f} tokens/s, "
                             f"{r['model_tflops_per_step']:.2f} model TFLOP/step ({r['achieved_tflops']:.3f} TFLOP/s)"),
    "sample_speed": _sample_speed,
    "kmeans": lambda r: (f"{r['seconds']:.2f} s compiled, {r['seconds_with_compile']:.2f} s with compilation; "
                         f"intra-cluster MSE {r['intra_mse']:.4f}, {r['iterations']} iterations"),
    "memory": lambda r: (f"{r['gib_per_device']:.1f} GiB per device ({r['remat']} remat): "
                         f"{'fits' if r['fits_limit'] else 'does not fit'} {r['limit_gib']:g} GiB"),
    "extract_speed": lambda r: (f"{r['variant']}, {r['image_size']} px, ten-crop: {r['images_per_sec']:.3f} images/s "
                                f"({r['views_per_sec']:.2f} views/s); host preprocessing "
                                f"{r['preprocess_images_per_sec']:.0f} images/s"),
    "tokenizer_speed": lambda r: (f"encode {r['encode_images_per_sec']:.2f}, decode {r['decode_images_per_sec']:.2f} "
                                  "images/s"),
    "tokenizer_quality": lambda r: (f"tiny tokenizer: PSNR {r['psnr']:.1f} dB, SSIM {r['ssim']:.3f}, usage "
                                    f"{100 * r['usage']:.0f} %" + (f"; dual {r['dual_psnr']:.1f} dB vs single "
                                                                    f"256-code {r['dual_psnr'] - r['dual_minus_single256_psnr']:.1f} dB"
                                                                    if "dual_psnr" in r else "")),
    "small_cnn": lambda r: (f"Fashion-MNIST classifier: test accuracy {r['test_accuracy']:.3f}, "
                            f"FID(train, test) {r['fid_train_test']:.3f}"),
    "eval_speed": lambda r: f"Inception-v3 features: {r['images_per_second']:.1f} images/s",
}

HEADERS = {
    "demo": ["variant", "wall time", "resume (2nd run)", "FID", "class accuracy"],
    "benchmarks": ["command", "result"],
}


def bench_row(key: str, r: Dict) -> List[str]:
    script = re.search(r"benchmarks/(\w+)\.py", key).group(1)
    return [f"`{key}`", FORMATS[script](r)]


def table_markdown(table: str, rows: List[List[str]]) -> str:
    head = HEADERS[table]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def build_tables(results: List[Dict], machine: str, date: str) -> Dict[str, str]:
    """{table: markdown} from {"table", "key", "result"} records (the newest per key wins), rows in
    JOBS order, each table followed by its provenance line: the date and machine its newest record
    was measured on (`machine`, `date` for records without them)."""
    latest = {(r["table"], r["key"]): r["result"] for r in results}
    prov = {r["table"]: (r.get("date", date), r.get("machine", machine)) for r in results}
    out: Dict[str, List[List[str]]] = {}
    for job in JOBS:
        r = latest.get((job.table, job.key))
        if r is None:
            continue
        row = demo_row(job.key, r) if job.table == "demo" else bench_row(job.key, r)
        out.setdefault(job.table, []).append(row)
    return {t: table_markdown(t, rows) + "\n\nGenerated by `python benchmarks/readme_figures.py` on {}: {}.".format(*prov[t])
            for t, rows in out.items()}


def rewrite(text: str, tables: Dict[str, str]) -> str:
    """Replaces the body between each table's markers; a marker pair missing from `text` is an error
    (nothing is written)."""
    for name, body in tables.items():
        pattern = re.compile(rf"(<!-- figures:{re.escape(name)} -->\n).*?(\n<!-- /figures:{re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README has no <!-- figures:{name} --> ... <!-- /figures:{name} --> markers")
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text, count=1)
    return text


# ----------------------------------------------------------------------------------------------
# Running


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cores of {cpu}, Python {platform.python_version()}, 1-minute load {load:.1f} at the end"


def last_json(stdout: str) -> Dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def run_job(job: Job, env) -> Dict:
    if job.table == "demo":
        with tempfile.TemporaryDirectory(prefix="iar_jax_figures_") as d:
            wd = os.path.join(d, job.key)
            cmd = [sys.executable, "-m", "iar_jax.cli", "demo", f"--variant={job.key}", f"--workdir={wd}",
                   "--noprogress"]
            subprocess.run(cmd, env=env, cwd=ROOT, check=True)
            with open(os.path.join(wd, "metrics.json")) as f:
                first = json.load(f)
            subprocess.run(cmd, env=env, cwd=ROOT, check=True)
            with open(os.path.join(wd, "metrics.json")) as f:
                first["resume_seconds"] = json.load(f)["this_run_seconds"]
            return first
    p = subprocess.run([sys.executable, *job.cmd], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return last_json(p.stdout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated tables (demo, benchmarks) or benchmark script names")
    ap.add_argument("--jsonl", default=os.path.join(ROOT, "benchmarks", "readme_figures.jsonl"))
    ap.add_argument("--from_jsonl", default="", help="rebuild the tables from this file without running anything")
    ap.add_argument("--dry-run", action="store_true", help="print the tables, leave README.md as it is")
    args = ap.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    results: List[Dict] = []
    if args.from_jsonl:
        with open(args.from_jsonl) as f:
            results = [json.loads(ln) for ln in f if ln.strip()]
    else:
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
               "IAR_JAX_COMPILATION_CACHE": "off",  # figures are measured with an empty compilation cache
               # the README's advice for CPU users: glibc's huge pages
               "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")}
        for job in JOBS:
            script = os.path.basename(job.cmd[0])[:-3] if job.cmd else "demo"
            if only and job.table not in only and script not in only:
                continue
            t0 = time.time()
            rec = {"table": job.table, "key": job.key, "result": run_job(job, env)}
            rec.update(machine=machine_description(), date=datetime.date.today().isoformat())
            print(f"{job.key}: {time.time() - t0:.0f} s {json.dumps(rec['result'])}", flush=True)
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(rec) + "\n")
            results.append(rec)
    tables = build_tables(results, machine_description(), datetime.date.today().isoformat())
    with open(README) as f:
        text = f.read()
    new = rewrite(text, tables)
    if args.dry_run:
        print("\n\n".join(tables.values()))
    elif new != text:
        with open(README + ".tmp", "w") as f:
            f.write(new)
        os.replace(README + ".tmp", README)
    print(json.dumps({"tables": sorted(tables), "rows": len(results), "readme_changed": new != text and not args.dry_run}))


if __name__ == "__main__":
    main()
