"""Reproduction of IAR's training-speed claim (arXiv 2501.00880, Fig. 3c: IAR-B reaches LlamaGen-B's
final FID after ~0.58x the training) in miniature on Fashion-MNIST; config and command:
`configs/repro_fmnist.py`.

For each codebook regime (codebook size, cluster size), each stage resumable from WORKDIR/REGIME/:
  tokenizer/     tiny VQ tokenizer (L2-normalised 8-dim codebook) on all training images
  rearrange/     balanced k-means over its codebook: mapping.npy
  codes/         codes of the first `code_images` training images (+ flips), ORIGINAL codebook
  heldout/       codes of the first `heldout_images` reference (test) images: teacher-forced robustness
  runs/ARM_sSEED/  training with a checkpoint every `eval_every` steps; then per checkpoint the
                 small-CNN FID of `eval_per_class` samples per class (evals.json, written as it goes),
                 and at the last step the teacher-forced robustness (robustness.json)
WORKDIR/table.json, table.md, curves.png: rewritten after every run.

Arms, paired by seed (same init, same batch order; they differ only in the loss and the id order):
  baseline  token CE (cluster weight 0)
  iar       token CE + cluster CE on the k-means-rearranged codebook
  random    token CE + cluster CE on clusters of randomly chosen codes (a random balanced assignment,
            one per seed): tests whether the rearrangement matters or only the extra loss term.

Speed: the seed-mean FID curve of an arm is interpolated (linearly between evaluated steps) to the
step where it first reaches the seed-mean baseline's final FID; the ratio to the baseline's last step
is the "fraction of the training" (1.0 for a curve that gets there only at the end, inf if never).
Its 95% interval resamples the seeds with replacement (the same seeds for every arm).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from iar_jax import pipeline

ARMS = {"baseline": (0.0, None), "iar": (1.0, "kmeans"), "random": (1.0, "random")}  # cluster weight, clusters


# ----------------------------------------------------------------------------------------------
# Table logic (pure)


def reach_step(steps: Sequence[int], fids: Sequence[float], target: float) -> float:
    """The step at which the curve first reaches `target`, linear between evaluated steps (the first
    step if it starts at or below it; inf if it never gets there)."""
    for i, (s, f) in enumerate(zip(steps, fids)):
        if f <= target:
            if i == 0:
                return float(s)
            s0, f0 = steps[i - 1], fids[i - 1]
            return float(s0 + (f0 - target) / (f0 - f) * (s - s0))
    return math.inf


def speed_ratio(steps: Sequence[int], base: np.ndarray, arm: np.ndarray) -> float:
    """base, arm: [seeds, steps] FID curves -> reach step of the arm's mean curve at the baseline mean
    curve's final FID, over the baseline's last step."""
    return reach_step(steps, arm.mean(0), float(base.mean(0)[-1])) / float(steps[-1])


def relative_change_last(steps: Sequence[int], fid: Sequence[float], frac: float = 0.2) -> float:
    """|FID(T) - FID((1 - frac) T)| / FID((1 - frac) T), FID linear between evaluated steps."""
    t0 = (1.0 - frac) * steps[-1]
    f0 = float(np.interp(t0, steps, fid))
    return abs(float(fid[-1]) - f0) / f0


def _percentile_ci(values: np.ndarray, level: float = 0.95):
    """(lo, hi) order statistics of bootstrap values (inf-safe: no interpolation)."""
    v = np.sort(np.asarray(values, np.float64))
    a = (1.0 - level) / 2.0
    return float(v[int(math.floor(a * (len(v) - 1)))]), float(v[int(math.ceil((1.0 - a) * (len(v) - 1)))])


def bootstrap(n_seeds: int, stat, n_boot: int, seed: int = 0):
    """stat(seed indices) at all seeds, and its 95% percentile interval over `n_boot` resamples of
    the seeds with replacement."""
    rng = np.random.default_rng(seed)
    point = stat(np.arange(n_seeds))
    if n_seeds < 2:
        return point, (point, point)
    vals = [stat(rng.integers(0, n_seeds, n_seeds)) for _ in range(n_boot)]
    return point, _percentile_ci(np.asarray(vals))


def _interval(point, ci) -> Dict[str, float]:
    return {"value": float(point), "lo": float(ci[0]), "hi": float(ci[1])}


def summarize(curves: Dict[str, Dict[int, Dict[str, Any]]], robustness: Optional[Dict[str, Dict[int, float]]] = None,
              n_boot: int = 2000) -> Dict[str, Any]:
    """curves[arm][seed] = {"steps", "fid", "class_accuracy"} (finished runs) -> one row per arm.

    Only seeds every arm has finished are used (pairing). Per arm: final FID and class accuracy (mean,
    95% bootstrap interval), the speed ratio (see the module docstring), the final-FID difference to
    the baseline paired by seed, and the robustness fraction (mean, interval)."""
    arms = list(curves)
    seeds = sorted(set.intersection(*[set(curves[a]) for a in arms])) if arms else []  # seeds every arm finished
    rows: Dict[str, Any] = {}
    if not seeds:
        return rows
    steps = curves[arms[0]][seeds[0]]["steps"]
    fid = {a: np.array([curves[a][s]["fid"] for s in seeds], np.float64) for a in arms}
    acc = {a: np.array([curves[a][s]["class_accuracy"][-1] for s in seeds], np.float64) for a in arms}
    n = len(seeds)
    for k, a in enumerate(arms):
        row: Dict[str, Any] = {"seeds": [int(s) for s in seeds], "final_step": int(steps[-1])}
        row["final_fid"] = _interval(*bootstrap(n, lambda i: fid[a][i, -1].mean(), n_boot, k))
        row["final_class_accuracy"] = _interval(*bootstrap(n, lambda i: acc[a][i].mean(), n_boot, k))
        row["fid_change_last_20pct"] = relative_change_last(steps, fid[a].mean(0))
        row["mean_fid_curve"] = [float(x) for x in fid[a].mean(0)]
        if "baseline" in fid:
            b = fid["baseline"]
            row["speed_ratio"] = _interval(*bootstrap(n, lambda i: speed_ratio(steps, b[i], fid[a][i]), n_boot, k))
            row["final_fid_minus_baseline"] = _interval(
                *bootstrap(n, lambda i: (fid[a][i, -1] - b[i, -1]).mean(), n_boot, k))
        if robustness and robustness.get(a) and all(s in robustness[a] for s in seeds):
            r = np.array([robustness[a][s] for s in seeds], np.float64)
            row["wrong_in_right_cluster"] = _interval(*bootstrap(n, lambda i: r[i].mean(), n_boot, k))
        rows[a] = row
    return rows


def _fmt(iv: Optional[Dict[str, float]], digits: int = 2) -> str:
    if iv is None:
        return "—"
    f = (lambda x: "∞" if math.isinf(x) else f"{x:.{digits}f}")
    return f"{f(iv['value'])} [{f(iv['lo'])}, {f(iv['hi'])}]"


def table_markdown(report_tables: Dict[str, Dict[str, Any]], chance: Optional[Dict[str, float]] = None) -> str:
    """One table per regime: values with their 95% bootstrap intervals over seeds."""
    out = []
    for regime, rows in report_tables.items():
        out.append(f"**{regime}**" + (f" (wrong-in-right-cluster by chance: {chance[regime]:.3f})"
                                      if chance and regime in chance else ""))
        out.append("")
        out.append("| arm | seeds | fraction of baseline steps to reach its final FID | final FID | "
                   "final FID − baseline | final class accuracy | wrong top-1 in the right cluster | "
                   "FID change, last 20% |")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for arm, r in rows.items():
            out.append(f"| {arm} | {len(r['seeds'])} | {_fmt(r.get('speed_ratio'))} | {_fmt(r['final_fid'])} | "
                       f"{_fmt(r.get('final_fid_minus_baseline'))} | {_fmt(r['final_class_accuracy'], 3)} | "
                       f"{_fmt(r.get('wrong_in_right_cluster'), 3)} | {100 * r['fid_change_last_20pct']:.1f}% |")
        out.append("")
    return "\n".join(out)


def plot_curves(path: str, curves_by_regime, title: str = "", n_boot: int = 1000) -> None:
    """One panel per regime: seed-mean FID per arm with its 95% bootstrap band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [r for r, c in curves_by_regime.items() if any(c.values())]
    if not regimes:
        return
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.5 * len(regimes), 4), dpi=100, squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        for arm, runs in curves_by_regime[regime].items():
            if not runs:
                continue
            steps = min((r["steps"] for r in runs.values()), key=len)
            fid = np.array([r["fid"][:len(steps)] for r in runs.values()], np.float64)
            rng = np.random.default_rng(0)
            boots = fid[rng.integers(0, len(fid), (n_boot, len(fid)))].mean(1)
            lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
            line, = ax.plot(steps, fid.mean(0), marker="o", ms=3, label=f"{arm} ({len(fid)} seeds)")
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_ylabel("small-CNN FID (lower is better)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(regime, fontsize=9)
        ax.legend()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def wrong_in_right_cluster(pred: np.ndarray, target: np.ndarray, cluster_of: np.ndarray) -> float:
    """Among wrong top-1 predictions (original code ids), the fraction in the target's cluster."""
    wrong = pred != target
    if not wrong.any():
        return float("nan")
    return float((cluster_of[pred[wrong]] == cluster_of[target[wrong]]).mean())


def random_mapping(num_codes: int, seed: int) -> np.ndarray:
    """A random old id -> new id permutation: consecutive blocks of new ids are random clusters."""
    return np.random.default_rng(seed).permutation(num_codes).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Stages


def load_datasets(config):
    """(train dataset, its first `code_images` images, reference dataset, note): full Fashion-MNIST,
    or the embedded subset with a warning when the Debian package is missing."""
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
    return train, _head(train, int(config.code_images)), ref, note


def _head(dataset, n: int):
    from iar_jax.data import datasets

    if not n or n >= len(dataset):
        return dataset
    return datasets.ArrayDataset(dataset.images[:n], dataset.labels[:n], dataset.num_classes, f"{dataset.name}[:{n}]")


def regime_configs(config) -> Dict[str, Any]:
    """name -> (tokenizer config, cluster size) of each regime in `config.regime_names`."""
    import ml_collections

    out = {}
    for name in [r.strip() for r in str(config.regime_names).split(",") if r.strip()]:
        if name not in config.regimes:
            raise ValueError(f"unknown regime {name!r} in config.regime_names; defined: {', '.join(config.regimes)}")
        r = config.regimes[name]
        n, m = int(r.codebook_size), int(r.cluster_size)
        if m < 2 or n % m:
            raise ValueError(f"regime {name}: cluster_size {m} must be >= 2 and divide codebook_size {n}; "
                             f"set --config.regimes.{name}.cluster_size")
        tok = ml_collections.ConfigDict(config.tokenizer.to_dict())
        tok.model.codebook_size = n
        out[name] = (tok, m)
    return out


def stages(config, rdir: str, tok_config, cluster_size: int, train, coded, heldout):
    """Tokenizer -> rearrangement -> codes (training and held-out), with the pipeline's resumable stages.
    Returns (tokenizer dir, k-means mapping.npy path, codes dir, held-out codes dir)."""
    tok_dir, re_dir, codes_dir, held_dir = (os.path.join(rdir, d) for d in ("tokenizer", "rearrange", "codes", "heldout"))
    pipeline.train_tokenizer_stage(tok_dir, tok_config, train, progress=False)
    mapping = pipeline.rearrange_stage(re_dir, tok_dir, cluster_size)["mapping_file"]
    size = int(tok_config.data.image_size)
    for out, ds in ((codes_dir, coded), (held_dir, heldout)):
        pipeline.extract_codes_stage(out, tok_dir, ds, size, batch_size=int(config.extract_batch),
                                 records_per_shard=8192, progress=False)
    return tok_dir, mapping, codes_dir, held_dir


def arm_mapping(rdir: str, arm: str, seed: int, kmeans_path: str, num_codes: int) -> str:
    """The mapping file an arm trains with (baseline: the k-means one; its loss ignores clusters)."""
    if ARMS[arm][1] != "random":
        return kmeans_path
    path = os.path.join(rdir, "random_mappings", f"s{seed}.npy")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npy"
        np.save(tmp, random_mapping(num_codes, 1000 + seed))
        os.replace(tmp, path)
    return path


def run_config(config, arm: str, seed: int, codes_dir: str, tok_dir: str, mapping_path: str, num_codes: int,
               cluster_size: int):
    c = pipeline.model_config_for(config.ar, codes_dir, tok_dir,
                              {"mapping_file": mapping_path, "cluster_size": int(cluster_size)})
    c.model.vocab_size = int(num_codes)
    c.loss.cluster_weight = ARMS[arm][0]
    c.train.seed = int(seed)
    c.train.ckpt_every = int(config.eval_every)
    c.train.keep_ckpts = int(c.train.num_steps) // int(config.eval_every) + 2
    return c


class Evaluator:
    """Per regime: samples a fixed class-balanced label set and scores it with the small-CNN FID and
    class accuracy; at the last step, the teacher-forced robustness on held-out codes.

    The sampler, decoder, teacher-forced forward and feature net are compiled once per regime; an
    arm's id order only changes the (tiny, jitted) id lookup before decoding."""

    def __init__(self, config, run_cfg, tok_dir: str, kmeans_path: str, cluster_size: int, held_dir: str,
                 ref_features: np.ndarray):
        import jax

        from iar_jax import sharding
        from iar_jax.data.records import RecordSource
        from iar_jax.evaluation import small_cnn
        from iar_jax.models import families
        from iar_jax.sampling import generate as gen
        from iar_jax.tokenizer.checkpoint import load_tokenizer

        self.mesh = sharding.make_mesh(run_cfg.mesh)
        _, self.sample_fn, _, self.param_shardings = gen.build_sampling(
            run_cfg, tok_dir, self.mesh, "", guidance="constant", cfg_scale=str(config.cfg_scale))
        vq_cfg, vq_params = load_tokenizer(tok_dir)
        self.decoder = gen.vq_decoder(vq_cfg, jax.device_put(vq_params))
        self._decode_fns: Dict[bytes, Any] = {}
        self.grid = int(run_cfg.model.grid_size)
        self.decode_batch = int(config.decode_batch)
        self.num_classes = int(run_cfg.model.num_classes)
        self.labels = gen.class_labels(0, self.num_classes, int(config.eval_per_class))
        dp = sharding.data_parallel_size(self.mesh) * jax.process_count()
        self.global_batch = -(-len(self.labels) // dp) * dp  # one chunk; generate pads and trims it
        self.cnn = small_cnn.load_params()
        self.ref_features = ref_features
        self.kmeans_cluster = np.load(kmeans_path) // int(cluster_size)  # original id -> k-means cluster
        held = RecordSource(held_dir)
        n = min(len(held), int(config.heldout_images))
        self.held = held.get(np.arange(n), np.zeros(n, np.int64))  # unflipped views
        module, _ = families.get_family(run_cfg.model_family).build(run_cfg)
        self.forward = jax.jit(lambda p, codes, labels: module.apply({"params": p}, codes, labels, train=False)
                               .argmax(-1))

    def fid(self, params, mapping: np.ndarray, out_dir: str, seed: int, keep: bool) -> Dict[str, float]:
        import jax

        from iar_jax.evaluation import metrics, small_cnn
        from iar_jax.sampling import generate as gen

        params = jax.device_put(params, self.param_shardings)
        key = mapping.tobytes()  # one id lookup (a small jit) per arm's mapping, not per FID point
        if key not in self._decode_fns:
            self._decode_fns[key] = _in_batches(
                gen.make_decode_fn(self.decoder, self.grid, False, np.argsort(mapping)), self.decode_batch)
        decode_fn = self._decode_fns[key]
        gen.generate(self.sample_fn, params, self.labels, out_dir, global_batch=self.global_batch, mesh=self.mesh,
                     decode_fn=decode_fn, num_classes=self.num_classes, seed=seed,
                     grid=100 if keep else 0, progress=False)
        with np.load(os.path.join(out_dir, "samples.npz")) as z:
            images, labels = z["arr_0"], z["labels"]
        pred = small_cnn.predict(self.cnn, images)
        result = {"fid": metrics.fid_from_features(pred["features"], self.ref_features),
                  "class_accuracy": float((pred["logits"].argmax(-1) == labels).mean())}
        if not keep:
            shutil.rmtree(out_dir)
        return result

    def robustness(self, params, mapping: np.ndarray, batch: int = 500) -> float:
        """Teacher forcing on the held-out codes: among wrong top-1 predictions, the fraction in the
        target's k-means cluster (ids taken back to the original codebook first)."""
        order = np.argsort(mapping)  # new id -> original id
        codes, labels = self.held["codes"], self.held["labels"]
        preds = [np.asarray(self.forward(params, mapping[codes[i:i + batch]], labels[i:i + batch]))
                 for i in range(0, len(codes), batch)]
        return wrong_in_right_cluster(order[np.concatenate(preds)], codes, self.kmeans_cluster)


def _in_batches(fn, batch: int):
    """fn over rows in slices of `batch` (0 = all at once): bounds the decoder's activations."""
    import jax.numpy as jnp

    if batch <= 0:
        return fn

    def batched(x):
        return jnp.concatenate([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])
    return batched


def eval_steps(run_cfg, config) -> List[int]:
    """K, 2K, ... and the last step."""
    total, every = int(run_cfg.train.num_steps), int(config.eval_every)
    return sorted(set(range(every, total + 1, every)) | {total})


def run_paths(rdir: str, arm: str, seed: int) -> str:
    return os.path.join(rdir, "runs", f"{arm}_s{seed}")


def read_curve(run_dir: str, steps: Sequence[int]) -> Optional[Dict[str, Any]]:
    """A finished run's curve from its evals.json (every step and the robustness), else None."""
    evals = pipeline.read_json(os.path.join(run_dir, "evals.json"), {})
    if any(str(s) not in evals for s in steps) or "robustness" not in evals[str(steps[-1])]:
        return None
    return {"steps": list(steps), "fid": [evals[str(s)]["fid"] for s in steps],
            "class_accuracy": [evals[str(s)]["class_accuracy"] for s in steps],
            "robustness": evals[str(steps[-1])]["robustness"]}


def train_and_eval_run(config, run_dir: str, run_cfg, evaluator: Evaluator, seed: int) -> None:
    """Trains one (arm, seed) run and evaluates its checkpoints; resumes at either point."""
    from iar_jax import checkpointing, trainer
    from iar_jax.models.iar import load_mapping

    done_path = os.path.join(run_dir, "train_done.json")
    if not os.path.exists(done_path):
        t0 = time.time()
        _, state = trainer.train_and_evaluate(run_cfg, run_dir)
        pipeline.check_finished(state["step"], run_cfg.train.num_steps, run_dir)
        pipeline.write_json(done_path, {"seconds": time.time() - t0})
    mapping = load_mapping(run_cfg.loss.mapping_file, int(run_cfg.model.vocab_size))
    evals_path = os.path.join(run_dir, "evals.json")
    evals = pipeline.read_json(evals_path, {})
    total = int(run_cfg.train.num_steps)
    expect = {"model_family": run_cfg.model_family, "model": trainer.structural_model_meta(run_cfg)}
    for step in eval_steps(run_cfg, config):
        if str(step) in evals and (step < total or "robustness" in evals[str(step)]):
            continue
        t0 = time.time()
        params, _ = checkpointing.load_params(run_dir, expect, step=step)
        keep = bool(config.keep_samples) and step == total
        ev = evals.get(str(step)) or evaluator.fid(params, mapping, os.path.join(run_dir, f"samples_{step}"), seed,
                                                  keep)
        if step == total:
            ev["robustness"] = evaluator.robustness(params, mapping)
        evals[str(step)] = dict(ev, seconds=time.time() - t0)
        pipeline.write_json(evals_path, evals)
        logging.info("%s step %d: %s", run_dir, step, evals[str(step)])


def _arms(config) -> List[str]:
    arms = [a.strip() for a in str(config.arms).split(",") if a.strip()]
    for a in arms:
        if a not in ARMS:
            raise ValueError(f"unknown arm {a!r} in config.arms; use {', '.join(ARMS)}")
    return arms


def collect(config, workdir: str, regimes) -> Dict[str, Dict[str, Dict[int, Any]]]:
    """curves[regime][arm][seed] of every finished run on disk."""
    steps = eval_steps(config.ar, config)
    curves = {}
    for regime in regimes:
        curves[regime] = {}
        for arm in _arms(config):
            runs = {s: read_curve(run_paths(os.path.join(workdir, regime), arm, s), steps)
                    for s in range(int(config.seeds))}
            curves[regime][arm] = {s: c for s, c in runs.items() if c is not None}
    return curves


def write_report(config, workdir: str, regimes, info: Dict[str, Any], out: Optional[str] = None) -> Dict[str, Any]:
    """table.md, table.json and curves.png in `out` (default `workdir`) from the finished runs of
    `regimes` on disk."""
    curves = collect(config, workdir, regimes)
    out = out or workdir
    tables = {r: summarize(c, {a: {s: run["robustness"] for s, run in runs.items()} for a, runs in c.items()},
                           int(config.bootstrap)) for r, c in curves.items()}
    md = table_markdown(tables, info.get("chance"))
    if info.get("note"):
        md += f"\nNote: {info['note']}\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md)
    report = {"tables": tables, "curves": {r: {a: {str(s): run for s, run in runs.items()} for a, runs in c.items()}
                                           for r, c in curves.items()}, **info}
    pipeline.write_json(os.path.join(out, "table.json"), report)
    plot_curves(os.path.join(out, "curves.png"), curves, info.get("title", ""))
    return report


def _validate(config):
    _arms(config)
    if int(config.eval_every) <= 0 or int(config.seeds) <= 0 or int(config.eval_per_class) <= 0:
        raise ValueError("config.eval_every, config.seeds and config.eval_per_class must be positive; "
                         "e.g. --config.eval_every=100")
    return regime_configs(config)


@contextlib.contextmanager
def _flock(path: str, blocking: bool = True):
    """An exclusive lock on `path` (yields False when `blocking` is off and another process holds it);
    the kernel drops it when the holder dies, so a killed worker never leaves a stale claim."""
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_timings(rdir: str) -> Dict[str, float]:
    """Seconds per stage and run of a regime, summed over the workers' timings*.json."""
    total: Dict[str, float] = {}
    for name in sorted(os.listdir(rdir)) if os.path.isdir(rdir) else []:
        if name.startswith("timings") and name.endswith(".json"):
            for k, v in pipeline.read_json(os.path.join(rdir, name), {}).items():
                total[k] = total.get(k, 0.0) + v
    return total


def run_regime(config, workdir: str, regime: str, worker: int = 0) -> None:
    """Stages and every unclaimed (seed, arm) run of one regime, seed-major (a partial regime stays
    paired); its own report in WORKDIR/REGIME/. Several workers may run a regime at once: the stages
    run under a lock, and each run is claimed with a lock that a busy run's holder keeps."""
    tok_cfg, m = _validate(config)[regime]
    rdir = os.path.join(workdir, regime)
    os.makedirs(os.path.join(rdir, "runs"), exist_ok=True)
    timings_path = os.path.join(rdir, f"timings.w{worker}.json")
    timings = pipeline.read_json(timings_path, {})

    def timed(name, fn, *args):
        t0 = time.time()
        out = fn(*args)
        timings[name] = timings.get(name, 0.0) + time.time() - t0
        pipeline.write_json(timings_path, timings)
        return out

    train, coded, ref, _ = load_datasets(config)
    n_codes = int(tok_cfg.model.codebook_size)
    with _flock(os.path.join(rdir, "stages.lock")):
        tok_dir, kmeans, codes_dir, held_dir = timed("stages", stages, config, rdir, tok_cfg, m, train, coded,
                                                     _head(ref, int(config.heldout_images)))
    info = _info(config, {regime: (tok_cfg, m)}, train, coded, ref)
    steps = eval_steps(config.ar, config)
    evaluator = None  # compiled on the first run this worker has to do
    for seed in range(int(config.seeds)):
        for arm in _arms(config):
            run_dir = run_paths(rdir, arm, seed)
            with _flock(run_dir + ".lock", blocking=False) as mine:
                if not mine or read_curve(run_dir, steps) is not None:
                    continue
                if evaluator is None:
                    base_cfg = run_config(config, "baseline", 0, codes_dir, tok_dir, kmeans, n_codes, m)
                    evaluator = timed("evaluator_setup", Evaluator, config, base_cfg, tok_dir, kmeans, m, held_dir,
                                      np.load(os.path.join(workdir, "ref_features.npy")))
                cfg = run_config(config, arm, seed, codes_dir, tok_dir,
                                 arm_mapping(rdir, arm, seed, kmeans, n_codes), n_codes, m)
                timed(f"{arm}_s{seed}", train_and_eval_run, config, run_dir, cfg, evaluator, seed)
            with _flock(os.path.join(rdir, "report.lock")):
                report = write_report(config, workdir, [regime], dict(info, timings={regime: read_timings(rdir)}),
                                      out=rdir)
            logging.info("after %s %s seed %d:\n%s", regime, arm, seed, table_markdown(report["tables"]))


def run_worker(config, workdir: str, regimes: Sequence[str], worker: int) -> None:
    """Worker `worker` of len(regimes): starts on regimes[worker], then helps with the others' runs
    (a worker whose regime is cheap does not sit idle while another regime still has runs to do)."""
    regimes = list(regimes)
    for regime in regimes[worker:] + regimes[:worker]:
        run_regime(config, workdir, regime, worker)


def _info(config, regimes, train, coded, ref) -> Dict[str, Any]:
    n_eval = int(config.eval_per_class) * int(train.num_classes)
    name = getattr(train, "name", config.dataset)
    return {"dataset": name, "tokenizer_images": len(train), "code_images": len(coded),
            "heldout_images": min(len(ref), int(config.heldout_images)), "num_eval_samples": n_eval,
            "num_ref_images": len(ref), "bootstrap": int(config.bootstrap),
            "regimes": {r: {"codebook_size": int(t.model.codebook_size), "cluster_size": m}
                        for r, (t, m) in regimes.items()},
            "chance": {r: (m - 1) / (int(t.model.codebook_size) - 1) for r, (t, m) in regimes.items()},
            "title": f"IAR vs baseline vs random clusters on {name} "
                     f"({n_eval} samples / FID point, mean and 95% bootstrap band over seeds)"}


def _run_children(config, workdir: str, regimes: Sequence[str]) -> None:
    """One `python -m iar_jax.experiment` worker process per regime (log in WORKDIR/worker{i}.log);
    SIGTERM is passed on to them (each saves its run and exits 143)."""
    import pickle
    import signal
    import subprocess
    import sys

    from iar_jax import runtime

    cfg_path = os.path.join(workdir, "config.pkl")  # pickled: JSON would turn the configs' tuples into lists
    with open(cfg_path + ".tmp", "wb") as f:
        pickle.dump(config, f)
    os.replace(cfg_path + ".tmp", cfg_path)
    procs = {}
    for i, r in enumerate(regimes):
        with open(os.path.join(workdir, f"worker{i}.log"), "a") as log:
            procs[r] = subprocess.Popen([sys.executable, "-m", "iar_jax.experiment", cfg_path, workdir, str(i),
                                         *regimes], stdout=log, stderr=subprocess.STDOUT)
    old = signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs.values()])
    try:
        codes = {r: p.wait() for r, p in procs.items()}
    finally:
        signal.signal(signal.SIGTERM, old)
    failed = {r: c for r, c in codes.items() if c}
    if failed and all(c in (runtime.PREEMPTED_EXIT_CODE, -signal.SIGTERM) for c in failed.values()):
        raise runtime.Preempted(f"experiment in {workdir} stopped by SIGTERM; run the same command again to resume")
    if failed:
        r, c = next(iter(failed.items()))
        i = list(regimes).index(r)
        raise RuntimeError(f"experiment worker {i} failed (exit {c}); see {os.path.join(workdir, f'worker{i}.log')}")


def run(config, workdir: str) -> Dict[str, Any]:
    """The whole experiment (resumable); returns the report written to workdir/table.json. With
    `config.parallel_regimes`, one worker process per regime (two on a 2-core machine: one tiny-model
    process leaves about a core idle; also with one regime, which the tests use), each starting on its
    own regime and then taking the others' unclaimed runs."""
    from iar_jax import checkpointing
    from iar_jax.evaluation import small_cnn

    t_start = time.time()
    regimes = _validate(config)
    os.makedirs(workdir, exist_ok=True)
    with checkpointing.WorkdirLock(workdir):  # one experiment per workdir (its workers share the runs)
        train, coded, ref, note = load_datasets(config)
        ref_path = os.path.join(workdir, "ref_features.npy")
        if not os.path.exists(ref_path):  # before any regime process starts: they share it
            ref_images = ref.images if ref.images.ndim == 4 else ref.images[..., None]
            np.save(ref_path + ".tmp.npy", small_cnn.predict(small_cnn.load_params(), ref_images)["features"])
            os.replace(ref_path + ".tmp.npy", ref_path)
        if bool(config.parallel_regimes):
            _run_children(config, workdir, list(regimes))
        else:
            for regime in regimes:
                run_regime(config, workdir, regime)
        info = dict(_info(config, regimes, train, coded, ref), note=note,
                    wall_seconds_this_invocation=time.time() - t_start,
                    timings={r: read_timings(os.path.join(workdir, r)) for r in regimes})
        report = write_report(config, workdir, list(regimes), info)
    # A run whose claim another process held was skipped: not finished, so no success exit.
    missing = [f"{r}/{a}_s{s}" for r, arms in report["curves"].items() for a in _arms(config)
               for s in range(int(config.seeds)) if str(s) not in arms.get(a, {})]
    if missing:
        raise checkpointing.WorkdirLockedError(
            f"experiment in {workdir} is unfinished: {', '.join(missing)} were held by another process; "
            "rerun the same command when it has stopped")
    return report


if __name__ == "__main__":  # one worker of `run` with parallel_regimes: CONFIG.pkl WORKDIR WORKER REGIME...
    import pickle
    import sys

    from iar_jax import runtime

    logging.basicConfig(level=logging.INFO)
    runtime.setup()
    with open(sys.argv[1], "rb") as f:
        _config = pickle.load(f)
    runtime.resolve_kernels(_config.ar)
    try:
        run_worker(_config, sys.argv[2], sys.argv[4:], int(sys.argv[3]))
    except runtime.Preempted as e:
        logging.warning("%s", e)
        sys.exit(runtime.PREEMPTED_EXIT_CODE)
