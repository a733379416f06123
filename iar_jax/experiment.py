"""Miniature reproduction of IAR's training-speed claim (arXiv 2501.00880: IAR-B reaches LlamaGen-B's
final FID ~42% sooner) on Fashion-MNIST; config and command: `configs/repro_fmnist.py`.

Stages, each resumable from the workdir (the first three are `iar_jax.pipeline`'s stage functions):
  tokenizer/   tiny VQ tokenizer on all training images
  rearrange/   balanced k-means over its codebook: mapping.npy
  codes/       codes of the first `code_images` training images (+ flips), ORIGINAL codebook
  runs/ARM_sSEED/  `trainer.train_and_evaluate` with a checkpoint every `eval_every` steps, then the
               small-CNN FID of each checkpoint (`sampling.generate`, `evaluation.small_cnn`) in
               evals.json (one entry per step, written as it goes)
  curves.png, table.md, table.json: rewritten after every run.

"Steps to reach the baseline's final FID" is paired by seed: run (arm, s) reaches it at the first
evaluated step whose FID <= the final FID of (baseline, s); both arms of a seed share the init and
the batch order, so the loss is the only difference.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from iar_jax import pipeline

ARMS = {"baseline": 0.0, "iar": 1.0}  # cluster-CE weight lambda of each arm


# ----------------------------------------------------------------------------------------------
# Table logic (pure)


def steps_to_reach(steps: Sequence[int], fids: Sequence[float], target: float) -> Optional[int]:
    """First evaluated step whose FID is <= target (None: never reached)."""
    for s, f in zip(steps, fids):
        if f <= target:
            return int(s)
    return None


def _mean_std(xs: Sequence[float]) -> Optional[Dict[str, float]]:
    if not len(xs):
        return None
    a = np.asarray(xs, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}


def summarize(curves: Dict[str, Dict[int, Dict[str, Sequence[float]]]]) -> Dict[str, Any]:
    """curves[arm][seed] = {"steps": [...], "fid": [...]} (complete runs only) -> table rows.

    Per arm: final FID (mean ± sample std over seeds), and steps to reach the baseline's final FID
    of the same seed (mean ± std over the seeds that reach it, with how many did).
    """
    base = curves.get("baseline", {})
    rows = {}
    for arm, runs in curves.items():
        finals = [r["fid"][-1] for _, r in sorted(runs.items())]
        reach, paired = [], 0
        for seed, r in sorted(runs.items()):
            if seed not in base:
                continue
            paired += 1
            s = steps_to_reach(r["steps"], r["fid"], base[seed]["fid"][-1])
            if s is not None:
                reach.append(s)
        accs = [r["class_accuracy"][-1] for r in runs.values() if r.get("class_accuracy")]
        rows[arm] = {"seeds": sorted(int(s) for s in runs), "final_fid": _mean_std(finals),
                     "final_class_accuracy": _mean_std(accs) if len(accs) == len(runs) else None,
                     "steps_to_baseline_final": _mean_std(reach), "reached": len(reach), "paired": paired,
                     "final_step": int(max(r["steps"][-1] for r in runs.values())) if runs else None}
    return rows


def _fmt(ms: Optional[Dict[str, float]], digits: int = 2) -> str:
    return "—" if ms is None else f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def table_markdown(rows: Dict[str, Any]) -> str:
    lines = ["| arm | seeds | steps to reach baseline's final FID | final FID | final class accuracy | final step |",
             "| --- | --- | --- | --- | --- | --- |"]
    for arm, r in rows.items():
        if r["paired"] == 0:
            reach = "— (no baseline run yet)"
        elif r["reached"] == 0:
            reach = "not reached"
        else:
            reach = _fmt(r["steps_to_baseline_final"], 0) + f" ({r['reached']}/{r['paired']} seeds reached)"
        acc = _fmt(r.get("final_class_accuracy"), 3)
        lines.append(f"| {arm} | {len(r['seeds'])} | {reach} | {_fmt(r['final_fid'])} | {acc} | {r['final_step']} |")
    return "\n".join(lines) + "\n"


def plot_curves(path: str, curves, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for arm, runs in curves.items():
        if not runs:
            continue
        steps = min((r["steps"] for r in runs.values()), key=len)
        fid = np.array([r["fid"][:len(steps)] for r in runs.values()], np.float64)
        mean, std = fid.mean(0), (fid.std(0, ddof=1) if len(fid) > 1 else np.zeros(len(steps)))
        line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{arm} ({len(fid)} seeds)")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("small-CNN FID (lower is better)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Stages


def load_datasets(config):
    """(train dataset, its first `code_images` images, reference images uint8 [N, 28, 28, 1], note):
    full Fashion-MNIST, or the embedded subset with a warning when the Debian package is missing."""
    from iar_jax.data import datasets

    name, note = config.dataset, ""
    if name == "fashion_mnist":
        try:
            train = datasets.load_dataset("fashion_mnist", "train", config.data_path or None)
            ref = datasets.load_dataset("fashion_mnist", config.ref_split, config.data_path or None)
        except ValueError as e:
            note = f"full Fashion-MNIST unavailable ({e}); using the embedded 6000-image subset"
            logging.warning(note)
            name = "fashion_mnist_embedded"
    if name != "fashion_mnist":
        train = datasets.load_dataset(name, "train")
        ref = datasets.load_dataset(name, config.ref_split)
    n = int(config.code_images)
    coded = train if not n or n >= len(train) else datasets.ArrayDataset(
        train.images[:n], train.labels[:n], train.num_classes, f"{train.name}[:{n}]")
    ref_images = ref.images if ref.images.ndim == 4 else ref.images[..., None]
    return train, coded, ref_images, note


def stages(config, workdir: str, train, coded):
    """Tokenizer -> rearrangement -> codes, with the pipeline's resumable stage functions.
    Returns (tokenizer dir, mapping.npy path, codes dir)."""

    tok_dir, re_dir, codes_dir = (os.path.join(workdir, d) for d in ("tokenizer", "rearrange", "codes"))
    pipeline.train_tokenizer_stage(tok_dir, config.tokenizer, train, progress=False)
    mapping = pipeline.rearrange_stage(re_dir, tok_dir, int(config.cluster_size))["mapping_file"]
    pipeline.extract_codes_stage(codes_dir, tok_dir, coded, int(config.tokenizer.data.image_size),
                                 batch_size=int(config.extract_batch), records_per_shard=8192, progress=False)
    return tok_dir, mapping, codes_dir


def run_config(config, arm: str, seed: int, codes_dir: str, tok_dir: str, mapping_path: str):
    # Both arms train on the rearranged ids; the baseline's cluster weight is 0.
    c = pipeline.model_config_for(config.ar, codes_dir, tok_dir,
                                  {"mapping_file": mapping_path, "cluster_size": int(config.cluster_size)})
    c.loss.cluster_weight = ARMS[arm]
    c.train.seed = int(seed)
    c.train.ckpt_every = int(config.eval_every)
    c.train.keep_ckpts = int(c.train.num_steps) // int(config.eval_every) + 2
    return c


class Evaluator:
    """Samples a fixed class-balanced label set from a model and scores it with the small-CNN FID.

    The sampler, decoder and feature net are compiled once and shared by every run and step."""

    def __init__(self, config, tok_dir: str, mapping_path: str, ref_images: np.ndarray, workdir: str):
        import jax

        from iar_jax import sharding
        from iar_jax.evaluation import small_cnn
        from iar_jax.sampling import generate as gen

        ar = config.ar
        self.mesh = sharding.make_mesh(ar.mesh)
        _, self.sample_fn, self.decode_fn, self.param_shardings = gen.build_sampling(
            ar, tok_dir, self.mesh, mapping_path, guidance="constant", cfg_scale=str(config.cfg_scale))
        self.num_classes = int(ar.model.num_classes)
        self.labels = gen.class_labels(0, self.num_classes, int(config.eval_per_class))
        dp = sharding.data_parallel_size(self.mesh) * jax.process_count()
        self.global_batch = -(-len(self.labels) // dp) * dp  # one chunk; generate pads and trims it
        self.cnn = small_cnn.load_params()
        ref_path = os.path.join(workdir, "ref_features.npy")
        if not os.path.exists(ref_path):
            np.save(ref_path, small_cnn.predict(self.cnn, ref_images)["features"])
        self.ref_features = np.load(ref_path)

    def __call__(self, params, out_dir: str, seed: int, keep: bool) -> Dict[str, float]:
        import jax

        from iar_jax.evaluation import metrics, small_cnn
        from iar_jax.sampling import generate as gen

        params = jax.device_put(params, self.param_shardings)
        gen.generate(self.sample_fn, params, self.labels, out_dir, global_batch=self.global_batch, mesh=self.mesh,
                     decode_fn=self.decode_fn, num_classes=self.num_classes, seed=seed,
                     grid=100 if keep else 0, progress=False)
        with np.load(os.path.join(out_dir, "samples.npz")) as z:
            images, labels = z["arr_0"], z["labels"]
        pred = small_cnn.predict(self.cnn, images)
        result = {"fid": metrics.fid_from_features(pred["features"], self.ref_features),
                  "class_accuracy": float((pred["logits"].argmax(-1) == labels).mean())}
        if not keep:
            shutil.rmtree(out_dir)
        return result


def eval_steps(run_cfg, config) -> List[int]:
    """K, 2K, ... and the last step."""
    total, every = int(run_cfg.train.num_steps), int(config.eval_every)
    return sorted(set(range(every, total + 1, every)) | {total})


def train_and_eval_run(config, run_dir: str, run_cfg, evaluator: Evaluator, seed: int) -> Dict[str, Any]:
    """Trains one (arm, seed) run and evaluates its checkpoints; resumes at either point."""
    from iar_jax import checkpointing, trainer

    done_path = os.path.join(run_dir, "train_done.json")
    if not os.path.exists(done_path):
        t0 = time.time()
        _, state = trainer.train_and_evaluate(run_cfg, run_dir)
        pipeline.check_finished(state["step"], run_cfg.train.num_steps, run_dir)
        pipeline.write_json(done_path, {"seconds": time.time() - t0})
    evals_path = os.path.join(run_dir, "evals.json")
    evals = pipeline.read_json(evals_path, {})
    total = int(run_cfg.train.num_steps)
    expect = {"model_family": run_cfg.model_family, "model": trainer.structural_model_meta(run_cfg)}
    for step in eval_steps(run_cfg, config):
        if str(step) in evals:
            continue
        t0 = time.time()
        params, _ = checkpointing.load_params(run_dir, expect, step=step)
        keep = bool(config.keep_samples) and step == total
        evals[str(step)] = dict(evaluator(params, os.path.join(run_dir, f"samples_{step}"), seed, keep),
                                seconds=time.time() - t0)
        pipeline.write_json(evals_path, evals)
        logging.info("%s step %d: %s", run_dir, step, evals[str(step)])
    steps = sorted(int(s) for s in evals)
    return {"steps": steps, "fid": [evals[str(s)]["fid"] for s in steps],
            "class_accuracy": [evals[str(s)]["class_accuracy"] for s in steps]}


def write_report(workdir: str, curves, info: Dict[str, Any]) -> Dict[str, Any]:
    rows = summarize(curves)
    md = table_markdown(rows)
    if info.get("note"):
        md += f"\nNote: {info['note']}\n"
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(md)
    report = {"table": rows, "curves": {a: {str(s): r for s, r in runs.items()} for a, runs in curves.items()},
              **info}
    pipeline.write_json(os.path.join(workdir, "table.json"), report)
    plot_curves(os.path.join(workdir, "curves.png"), curves, info.get("title", ""))
    return report


def run(config, workdir: str) -> Dict[str, Any]:
    """The whole experiment (resumable); returns the report written to workdir/table.json."""
    t_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    arms = [a.strip() for a in str(config.arms).split(",") if a.strip()]
    for a in arms:
        if a not in ARMS:
            raise ValueError(f"unknown arm {a!r} in config.arms; use {', '.join(ARMS)}")
    if int(config.eval_every) <= 0 or int(config.seeds) <= 0:
        raise ValueError("config.eval_every and config.seeds must be positive; e.g. --config.eval_every=100")
    timings = pipeline.read_json(os.path.join(workdir, "timings.json"), {})

    def timed(name, fn, *args):
        t0 = time.time()
        out = fn(*args)
        timings[name] = timings.get(name, 0.0) + time.time() - t0
        pipeline.write_json(os.path.join(workdir, "timings.json"), timings)
        return out

    train, coded, ref_images, note = load_datasets(config)
    tok_dir, mapping_path, codes_dir = timed("tokenizer_rearrange_codes", stages, config, workdir, train, coded)
    evaluator = timed("evaluator_setup", Evaluator, config, tok_dir, mapping_path, ref_images, workdir)
    info = {"dataset": getattr(train, "name", config.dataset), "tokenizer_images": len(train),
            "code_images": len(coded), "note": note,
            "num_eval_samples": len(evaluator.labels), "num_ref_images": len(ref_images),
            "title": f"IAR vs baseline on {getattr(train, 'name', config.dataset)} "
                     f"({len(evaluator.labels)} samples / FID point)"}
    curves: Dict[str, Dict[int, Any]] = {a: {} for a in arms}
    runs = [(seed, arm) for seed in range(int(config.seeds)) for arm in arms]  # seed-major: partial tables stay paired
    for k, (seed, arm) in enumerate(runs):
        run_dir = os.path.join(workdir, "runs", f"{arm}_s{seed}")
        cfg = run_config(config, arm, seed, codes_dir, tok_dir, mapping_path)
        finished = os.path.exists(os.path.join(run_dir, "evals.json")) and \
            len(pipeline.read_json(os.path.join(run_dir, "evals.json"))) == len(eval_steps(cfg, config))
        curves[arm][seed] = timed(f"run_{arm}_s{seed}", train_and_eval_run, config, run_dir, cfg, evaluator, seed)
        if not finished or k == len(runs) - 1:  # partial results after every new run
            info["wall_seconds_this_invocation"] = time.time() - t_start
            info["timings"] = timings
            report = write_report(workdir, curves, info)
            logging.info("table after %s seed %d:\n%s", arm, seed, table_markdown(report["table"]))
    return report
