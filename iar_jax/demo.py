"""The offline demo (`iar-jax demo`): the whole pipeline in miniature on the embedded Fashion-MNIST subset.

Stages, each writing `done.json` into its folder of the workdir when it completes:
  tokenizer/  tiny VQ tokenizer (IAR2: the dual semantic + detail quantizer), PSNR on test images
  rearrange/  balanced k-means over the codebook -> mapping.npy (IAR only; IAR2 has no cluster loss)
  codes/      codes of every training image and its flip, ORIGINAL codebook
  model/      tiny IAR (token CE + cluster CE on the rearranged ids) or tiny IAR2
  samples/    `per_class` samples of each of the 10 classes (IAR2: attention-guided CFG)
  evaluate/   small-CNN FID against the embedded test split, class accuracy
and in the workdir: grid.png (one row per class), metrics.json, summary.txt, demo_config.json.
Rerunning skips finished stages; an interrupted one continues from its checkpoints (tokenizer,
model), shards (codes) or chunks (samples). `get_config(variant, "smoke")` is a seconds-long
version for tests and the notebook.

The stages are `iar_jax.pipeline`'s; this module holds the demo's settings, its run over them and
the summary.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict

import ml_collections
import numpy as np

from iar_jax import pipeline
from iar_jax.data.datasets import FASHION_MNIST_CLASSES as CLASSES

VARIANTS = ("iar", "iar2")
PRESETS = ("default", "smoke")
STAGES = ("tokenizer", "rearrange", "codes", "model", "samples", "evaluate")


def default_workdir(variant: str = "iar") -> str:
    return os.path.join(os.path.expanduser("~"), "iar-jax-demo", variant)


def get_config(variant: str = "iar", preset: str = "default") -> ml_collections.ConfigDict:
    """All demo settings: the tokenizer and model configs (configs/*.py tiny presets) and the stages'."""
    from iar_jax.config_lib import load_config

    if variant not in VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r}; use --variant=iar or --variant=iar2")
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; use default or smoke")
    iar2, smoke = variant == "iar2", preset == "smoke"
    c = ml_collections.ConfigDict()
    c.variant, c.preset = variant, preset
    c.dataset = "fashion_mnist_embedded"  # 6000 train / 1000 test images, shipped with the package

    # Tokenizer: 4x downsampling (7x7 tokens: short AR sequences), 512 codes (IAR2: 256 + 1024). IAR:
    # 200 steps (19.1 dB; 300 reach 20.0) save ~36 s of a 2-core run for the model, which decides the
    # class accuracy. The dual quantizer needs its 300: at 200 (19.4 dB) IAR2 fell 0.66 -> 0.60, FID 40 -> 66.
    tok = c.tokenizer = load_config("configs/tokenizer.py:" + ("tiny_dual" if iar2 else "tiny7"))
    tok.model.encoder_ch_mult = tok.model.decoder_ch_mult = (1, 1, 2)
    tok_steps = 300 if iar2 else 200
    tok.train.update(dict(num_steps=4 if smoke else tok_steps, global_batch=8 if smoke else 32,
                          log_every=2 if smoke else 10,
                          ckpt_every=2 if smoke else 100))
    tok.data.update(dict(name=c.dataset, eval_images=16 if smoke else 500))

    c.cluster_size = 16  # IAR: 512 codes -> 32 clusters
    c.extract = ml_collections.ConfigDict(dict(batch_size=256, records_per_shard=1000, num_images=64 if smoke else 0))

    if iar2:
        m = c.model = load_config("configs/iar2.py:tiny,grid=7,vocab=256,detail_vocab=1024")
        m.model.head_layers = 1  # the head runs at every position: 2 blocks made a CPU step ~3x dearer
        m.loss.semantic_weight = 2.0  # w1 of one reference recipe: the semantic sub-token carries the class
    else:
        m = c.model = load_config("configs/iar.py:tiny,grid=7,vocab=512,cluster=16")
        m.model.update(dict(dim=128, n_head=4))  # 2 x 64 learns the class too slowly for CFG to show it
    # A few hundred steps, a few epochs of the 12000 codes: no dropout (nothing to overfit yet; class
    # dropout stays, CFG needs it), a high lr cosine-decayed as IAR2's recipe.
    m.model.update(dict(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0))
    m.optim.update(dict(lr=2e-3, schedule="cosine", min_lr=1e-4, warmup_steps=0 if smoke else 20))
    # IAR2's local-context head makes a step dearer than IAR's on a CPU: half the batch.
    steps, batch = (600, 32) if iar2 else (450, 64)
    m.train.update(dict(num_steps=4 if smoke else steps, global_batch=8 if smoke else batch,
                        log_every=2 if smoke else 10, ckpt_every=2 if smoke else 100))
    m.data.num_workers = 0

    # A low temperature trades diversity for samples that keep their class: on one trained IAR, 0.6 ->
    # 0.3 took class accuracy 0.80 -> 0.87 (FID 21 -> 28); stronger guidance lowers both (CFG 3: 0.79,
    # FID 35); at 0.3 IAR does best at CFG 1.5-1.75. IAR2 confuses neighbouring classes (shirt ->
    # pullover, ankle boot -> bag) and needs both lower: on one trained IAR2 (sampling seeds 0 and 1),
    # temperature 0.3 -> 0.1 took 0.67 -> 0.71, and the reference's 1.75 -> 3.0 schedule raised to
    # 2.5 -> 4.0 took 0.71 -> 0.74 (FID 44 -> 51-53).
    c.sample = ml_collections.ConfigDict(dict(
        per_class=2 if smoke else 100, global_batch=20 if smoke else 250, grid_per_class=2 if smoke else 10, seed=0,
        temperature="0.1" if iar2 else "0.3", top_k="0", top_p="1.0"))
    if iar2:  # the reference's progressive attention-guided CFG (for both sub-tokens), stronger
        c.sample.update(dict(guidance="attention", cfg_scale="", cfg_start="2.5", cfg_end="4.0", w_attn="0.05"))
    else:
        c.sample.update(dict(guidance="constant", cfg_scale="1.75", cfg_start="", cfg_end="", w_attn=""))
    c.eval = ml_collections.ConfigDict(dict(ref_split="test", ref_images=64 if smoke else 0))
    return c


def save_class_grid(path: str, images: np.ndarray, labels: np.ndarray, per_class: int, scale: int = 2,
                    names=CLASSES) -> str:
    """One row per class: the class name, then the first `per_class` samples of that class, upscaled
    `scale`x (a class without samples keeps its row, empty)."""
    from PIL import Image, ImageDraw, ImageFont

    from iar_jax.images import make_grid

    classes = np.unique(labels)
    tiles = np.zeros((len(classes), per_class) + images.shape[1:], np.uint8)
    for r, c in enumerate(classes):
        own = images[labels == c][:per_class]
        tiles[r, :len(own)] = own
    rows = make_grid(tiles.reshape((-1,) + images.shape[1:]), ncols=per_class).repeat(scale, 0).repeat(scale, 1)
    h = images.shape[1] * scale
    font = ImageFont.load_default(size=max(10, h // 4))
    label_w = 8 + max(int(np.ceil(font.getlength(str(names[c])))) for c in classes)
    grid = Image.new("RGB", (label_w + rows.shape[1], rows.shape[0]), "black")
    grid.paste(Image.fromarray(rows[..., 0] if rows.shape[-1] == 1 else rows).convert("RGB"), (label_w, 0))
    draw = ImageDraw.Draw(grid)
    for r, c in enumerate(classes):
        draw.text((label_w - 4, r * h + h // 2), str(names[c]), fill="white", font=font, anchor="rm")
    grid.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# The whole run


def stage_dirs(workdir: str) -> Dict[str, str]:
    return {name: os.path.join(workdir, name) for name in STAGES}


def resolved_config(config, workdir: str):
    """`config` as it runs in `workdir`: the model reads this workdir's codes and tokenizer and (IAR)
    its rearrangement's mapping file, so demo_config.json and metrics.json record the truth."""
    c = ml_collections.ConfigDict(config.to_dict())
    d = stage_dirs(workdir)
    rearrangement = ({"mapping_file": os.path.join(d["rearrange"], "mapping.npy"),
                      "cluster_size": int(config.cluster_size)} if config.variant == "iar" else None)
    c.model = pipeline.model_config_for(config.model, d["codes"], d["tokenizer"], rearrangement)
    return c


def check_settings(workdir: str, config) -> None:
    """Records the settings in workdir/demo_config.json; a rerun with other settings is an error."""
    path = os.path.join(workdir, "demo_config.json")
    now = json.loads(config.to_json())
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != now:
            diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
            raise ValueError(f"{workdir} holds a demo run with other settings ({', '.join(diff)}: variant "
                             f"{old.get('variant')}, preset {old.get('preset')}); use a fresh --workdir or the "
                             "original --variant")
        return
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(now, f, indent=1, sort_keys=True)


def run(config, workdir: str, progress: bool = True, echo: Callable[[str], None] = print) -> Dict[str, Any]:
    """Runs (or resumes) every stage; writes grid.png, metrics.json and summary.txt; returns the metrics."""
    from iar_jax.data import datasets

    t_start = time.time()
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = resolved_config(config, workdir)
    check_settings(workdir, config)
    d = stage_dirs(workdir)
    # A stage that is not done invalidates the later ones (they resume from their own files).
    first = next((i for i, name in enumerate(STAGES) if not pipeline.read_done(d[name])), len(STAGES))
    for name in STAGES[first + 1:]:
        if pipeline.read_done(d[name]):
            os.remove(os.path.join(d[name], pipeline.DONE))
    skipped = list(STAGES[:first])
    if skipped:
        echo(f"resuming in {workdir}: done already: {', '.join(skipped)}")
    from iar_jax import runtime

    runtime.enable_compilation_cache()  # a resumed run skips most compiles
    train = datasets.load_dataset(config.dataset, "train")
    if int(config.extract.num_images):
        n = int(config.extract.num_images)
        train = datasets.ArrayDataset(train.images[:n], train.labels[:n], train.num_classes, f"{train.name}[:{n}]")
    test = datasets.load_dataset(config.dataset, config.eval.ref_split)
    images = pipeline.dataset_images
    ref = images(test, int(config.eval.ref_images))
    records = {}
    iar = config.variant == "iar"

    tok_eval = images(test, int(config.tokenizer.data.eval_images))
    records["tokenizer"] = pipeline.train_tokenizer_stage(d["tokenizer"], config.tokenizer, train, tok_eval, progress)
    if iar:
        records["rearrange"] = pipeline.rearrange_stage(d["rearrange"], d["tokenizer"], int(config.cluster_size))
    else:
        records["rearrange"] = pipeline.read_done(d["rearrange"]) or pipeline.mark_done(d["rearrange"], {
            "seconds": 0.0, "skipped": "IAR2 trains without the cluster loss: no rearrangement"})
    r = records["rearrange"]
    echo("2/6 rearrange: " + (r.get("skipped") or f"intra-cluster MSE {r['intra_mse']:.4f}"))
    records["codes"] = pipeline.extract_codes_stage(d["codes"], d["tokenizer"], train,
                                                    int(config.tokenizer.data.image_size),
                                                    int(config.extract.batch_size),
                                                    int(config.extract.records_per_shard), progress)
    records["model"] = pipeline.train_model_stage(d["model"], config.model, progress)
    records["samples"] = pipeline.sample_stage(d["samples"], config.model, d["model"], d["tokenizer"], config.sample,
                                               progress)
    grid_path = os.path.join(workdir, "grid.png")
    with np.load(records["samples"]["npz"]) as z:
        if not os.path.exists(grid_path) or os.path.getmtime(grid_path) < os.path.getmtime(records["samples"]["npz"]):
            save_class_grid(grid_path, z["arr_0"], z["labels"], int(config.sample.grid_per_class))
    records["evaluate"] = pipeline.evaluate_stage(d["evaluate"], records["samples"]["npz"], ref, images(train))
    echo("6/6 evaluate: done")

    ev = records["evaluate"]
    metrics = {
        "variant": config.variant, "preset": config.preset, "workdir": workdir,
        "fid": ev["fid"], "class_accuracy": ev["class_accuracy"], "precision": ev["precision"],
        "recall": ev["recall"], "fid_real_train": ev.get("fid_real_train"), "num_samples": ev["num_samples"],
        "num_ref_images": ev["num_ref_images"], "tokenizer": records["tokenizer"]["eval"],
        "model_steps": records["model"]["steps"], "model_final_loss": records["model"]["final_metrics"].get("loss"),
        "stage_seconds": {k: round(float(r.get("seconds", 0.0)), 1) for k, r in records.items()},
        "skipped_stages": skipped, "this_run_seconds": round(time.time() - t_start, 1),
        "grid": grid_path, "config": json.loads(config.to_json()),  # every setting this run used
    }
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    text = summary_text(metrics, config)
    with open(os.path.join(workdir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    echo(text)
    return metrics


def sample_more(config, workdir: str, out: str, per_class: int = 4, seed: int = 1, progress: bool = False,
                **sampling) -> Dict[str, np.ndarray]:
    """New samples from a finished demo's model (e.g. another seed or guidance, keys as config.sample)
    into `out` (resumable); returns {"images": uint8 [10 * per_class, 28, 28, 3], "labels"}."""
    from iar_jax.sampling import generate as gen

    workdir = os.path.abspath(os.path.expanduser(workdir))
    d = stage_dirs(workdir)
    if not pipeline.read_done(d["model"]):
        raise ValueError(f"{workdir} has no trained demo model; run `iar-jax demo --workdir={workdir}` first")
    s = ml_collections.ConfigDict(config.sample.to_dict())
    s.update(sampling)
    model_cfg = resolved_config(config, workdir).model
    labels = gen.class_labels(0, int(model_cfg.model.num_classes), int(per_class))
    pipeline.sample_classes(model_cfg, d["model"], d["tokenizer"], out, labels, s, len(labels), int(seed), progress)
    with np.load(os.path.join(out, "samples.npz")) as z:
        return {"images": z["arr_0"], "labels": z["labels"]}


def summary_text(m: Dict[str, Any], config) -> str:
    tok = m["tokenizer"] or {}
    names = {"usage": "semantic " if "usage_detail" in tok else "", "usage_detail": "detail "}
    usage = ", ".join(f"{names[k]}{tok[k]:.0%}" for k in names if k in tok)
    secs = m["stage_seconds"]
    name = "IAR2 (dual codebook, attention-guided CFG)" if m["variant"] == "iar2" else "IAR (cluster loss)"
    t, mc, s = config.tokenizer, config.model, config.sample
    grid = int(t.data.image_size) // 2 ** (len(t.model.encoder_ch_mult) - 1)
    codes = (f"{t.model.semantic_codebook_size} semantic + {t.model.codebook_size} detail codes" if t.model.dual
             else f"{t.model.codebook_size} codes")
    o = mc.optim
    lr = f"lr {o.lr:g}" + (f" cosine to {o.min_lr:g}" if o.schedule == "cosine" else "")
    cfg = (f"CFG {s.cfg_start} -> {s.cfg_end}, w_attn {s.w_attn}" if s.guidance == "attention" else
           f"CFG {s.guidance} {s.cfg_scale}")
    cluster = (f", cluster CE (clusters of {mc.loss.cluster_size}) on {mc.loss.mapping_file}"
               if mc.get("loss", {}).get("mapping_file") else "")
    lines = [
        f"iar-jax demo: {name}, preset {m['preset']}, on the embedded Fashion-MNIST subset",
        f"  tokenizer   {t.train.num_steps} steps of batch {t.train.global_batch}, lr {t.optim.lr:g}, {grid}x{grid} "
        f"tokens, {codes}; PSNR {tok.get('psnr', float('nan')):.2f} dB" + (f", usage {usage}" if usage else ""),
        f"  model       {mc.model.n_layer} layers x {mc.model.dim}, {m['model_steps']} steps of batch "
        f"{mc.train.global_batch}, {lr}" + (f", final loss {m['model_final_loss']:.3f}"
                                            if m["model_final_loss"] is not None else "") + cluster,
        f"  samples     {m['num_samples']} ({s.per_class} per class), {cfg}, temperature {s.temperature}, "
        f"top-k {s.top_k}, top-p {s.top_p}",
        f"  FID (small CNN, vs {m['num_ref_images']} test images): {m['fid']:.2f}"
        + (f"   (real training images: {m['fid_real_train']:.2f})" if m.get("fid_real_train") is not None else ""),
        f"  class accuracy of the samples: {m['class_accuracy']:.1%} (chance 10%)",
        "  seconds     " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items())
        + f"; this run {m['this_run_seconds']:.0f}",
        f"  outputs     {m['grid']} (rows: {', '.join(CLASSES)})",
        f"              {os.path.join(m['workdir'], 'metrics.json')}, {os.path.join(m['workdir'], 'summary.txt')}, "
        f"{os.path.join(m['workdir'], 'demo_config.json')} (every setting)",
        "  rerun the same command to resume; delete a stage's done.json to redo it",
    ]
    return "\n".join(lines)
