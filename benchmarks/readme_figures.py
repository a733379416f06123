"""Reruns the README's measured figures and rewrites its tables from their JSON lines.

    python benchmarks/readme_figures.py                       # demo (both variants) + every benchmark
    python benchmarks/readme_figures.py --only=demo           # one table
    python benchmarks/readme_figures.py --dry-run             # print the new tables; README untouched
    python benchmarks/readme_figures.py --from_jsonl=runs.jsonl   # rewrite from saved results, no runs

Each generated table in README.md sits between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`
and is entirely this script's output: one row per job with the date and 1-minute load it was measured
at, then the machine. Every run's JSON result is appended to --jsonl (default
benchmarks/readme_figures.jsonl, committed) as {"table", "key", "result", "date", "machine", "load"};
the tables are rebuilt from all of its records (the newest per row wins), so `--only` reruns some
rows and keeps the others. The demo runs from scratch
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
    """r: the first run's metrics.json plus the wall time of its command and of the rerun (resume)."""
    return [f"`{variant}`", _duration(r.get("command_seconds", r["this_run_seconds"])), _duration(r["resume_seconds"]),
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
    "restore_memory": lambda r: (f"params {r['params_bytes'] / 2**30:.2f} GiB; sampling restore peak RSS "
                                 f"+{r['peak_rss_bytes'] / 2**30:.2f} GiB ({r['ratio']:.2f}x; goal "
                                 f"{r['goal_ratio']:g}x; largest array {r['largest_array_bytes'] / 2**30:.2f} GiB)"
                                 + (f"; whole train state {r['full_state_ratio']:.2f}x" if "full_state_ratio" in r
                                    else "")),
    "extract_speed": lambda r: (f"{r['variant']}, {r['image_size']} px, ten-crop: {r['images_per_sec']:.3f} images/s "
                                f"({r['views_per_sec']:.2f} views/s); host preprocessing "
                                f"{r['preprocess_images_per_sec']:.0f} images/s"),
    "tokenizer_speed": lambda r: (f"encode {r['encode_images_per_sec']:.2f}, decode {r['decode_images_per_sec']:.2f} "
                                  "images/s"),
    "tokenizer_quality": lambda r: (f"`{r.get('single_variant', 'tiny')}` tokenizer: PSNR {r['psnr']:.1f} dB, "
                                    f"SSIM {r['ssim']:.3f}, usage "
                                    f"{100 * r['usage']:.0f} %" + (f"; dual {r['dual_psnr']:.1f} dB vs single "
                                                                    f"256-code {r['dual_psnr'] - r['dual_minus_single256_psnr']:.1f} dB"
                                                                    if "dual_psnr" in r else "")),
    "small_cnn": lambda r: (f"Fashion-MNIST classifier: test accuracy {r['test_accuracy']:.3f}, "
                            f"FID(train, test) {r['fid_train_test']:.3f}"),
    "eval_speed": lambda r: f"Inception-v3 features: {r['images_per_second']:.1f} images/s",
}

HEADERS = {
    "demo": ["variant", "wall time", "resume (2nd run)", "FID", "class accuracy", "measured"],
    "benchmarks": ["command", "result", "measured"],
}


def bench_row(key: str, r: Dict) -> List[str]:
    script = re.search(r"benchmarks/(\w+)\.py", key).group(1)
    return [f"`{key}`", FORMATS[script](r)]


def table_markdown(table: str, rows: List[List[str]]) -> str:
    head = HEADERS[table]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _measured(rec: Dict) -> str:
    load = rec.get("load")
    return rec.get("date", "?") + ("" if load is None else f", load {load:.1f}")


def build_tables(results: List[Dict], machine: str) -> Dict[str, str]:
    """{table: markdown} from {"table", "key", "result", "date", "load", "machine"} records (the newest
    per key wins), rows in JOBS order, each with its own date and load; then the machine the
    newest record of the table ran on (`machine` for records without one)."""
    latest = {(r["table"], r["key"]): r for r in results}
    out: Dict[str, List[List[str]]] = {}
    newest: Dict[str, Dict] = {}
    for job in JOBS:
        rec = latest.get((job.table, job.key))
        if rec is None:
            continue
        r = rec["result"]
        row = demo_row(job.key, r) if job.table == "demo" else bench_row(job.key, r)
        out.setdefault(job.table, []).append(row + [_measured(rec)])
        if rec.get("date", "") >= newest.get(job.table, {}).get("date", ""):
            newest[job.table] = rec
    return {t: table_markdown(t, rows) + "\n\nGenerated by `python benchmarks/readme_figures.py` on {}.".format(
        newest[t].get("machine", machine)) for t, rows in out.items()}


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
    return f"{os.cpu_count()} cores of {cpu}, Python {platform.python_version()}"


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
            walls = []
            for _ in range(2):  # the whole command, interpreter start and imports included
                t0 = time.time()
                subprocess.run(cmd, env=env, cwd=ROOT, check=True)
                walls.append(time.time() - t0)
                if len(walls) == 1:
                    with open(os.path.join(wd, "metrics.json")) as f:
                        first = json.load(f)
            return dict(first, command_seconds=walls[0], resume_seconds=walls[1])
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
    source = args.from_jsonl or args.jsonl
    results: List[Dict] = []
    if os.path.exists(source):
        with open(source) as f:
            results = [json.loads(ln) for ln in f if ln.strip()]
    elif args.from_jsonl:
        raise SystemExit(f"--from_jsonl={args.from_jsonl} does not exist; name a file this script wrote")
    n_old = len(results)
    if not args.from_jsonl:
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
            rec.update(machine=machine_description(), date=datetime.date.today().isoformat(),
                       load=round(os.getloadavg()[0], 1))  # 1-minute load at the end of the job
            print(f"{job.key}: {time.time() - t0:.0f} s {json.dumps(rec['result'])}", flush=True)
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(rec) + "\n")
            results.append(rec)
    tables = build_tables(results, machine_description())
    with open(README) as f:
        text = f.read()
    new = rewrite(text, tables)
    if args.dry_run:
        print("\n\n".join(tables.values()))
    elif new != text:
        with open(README + ".tmp", "w") as f:
            f.write(new)
        os.replace(README + ".tmp", README)
    print(json.dumps({"tables": sorted(tables), "records": len(results), "new_records": len(results) - n_old,
                      "readme_changed": new != text and not args.dry_run}))


if __name__ == "__main__":
    main()
