"""Generation at scale: sharded sampling in resumable chunks -> PNG grid + ADM `samples.npz`.

* Every sample has a GLOBAL index i in [0, num_samples); its label is fixed up front (random with
  the seed, or class-balanced) and its randomness is fold_in(seed, i), so the images do not depend
  on the device count, host count or batch size.
* Work is cut into chunks of `global_batch` samples; each chunk is sharded over the mesh's batch
  axes (data, fsdp) and over hosts. Process 0 writes `chunks/chunk_XXXXXX.npz` atomically once a
  chunk is decoded, so a killed run restarts at the first missing chunk.
* num_samples need not divide by the global batch: the last chunk is PADDED with dummy samples
  (label 0) and trimmed before writing.
* Output (process 0): `samples.npz` with `arr_0` uint8 [N, H, W, 3] and `arr_1` class labels [N]
  (ADM evaluator format; the labels also as `labels`); `grid.png` with the first images. Images
  are converted like the reference scripts: optional bicubic resize (PyTorch `F.interpolate(mode=
  'bicubic')` weights, a = −0.75) of the [-1, 1] decoder output, then clip(127.5·x + 128, 0, 255)
  truncated to uint8.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from iar_jax.images import save_grid, to_uint8
from iar_jax.sampling.sampler import SamplerSpec, StepFns, check_labels, sample_tokens

# ----------------------------------------------------------------------------------------------
# Labels and images


def class_labels(num_samples: int, num_classes: int, per_class: int = 0, seed: int = 0) -> np.ndarray:
    """Labels of all samples: `per_class` > 0 gives each class exactly that many (ADM protocol: 50 ×
    1000 = 50 000), else labels are drawn uniformly with the seed (as the reference scripts do)."""
    if per_class > 0:
        if num_samples and num_samples != per_class * num_classes:
            raise ValueError(f"num_samples={num_samples} != per_class {per_class} × num_classes {num_classes}; "
                             f"drop --num_samples or set it to {per_class * num_classes}")
        return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
    if num_samples <= 0:
        raise ValueError(f"num_samples={num_samples} must be positive (or give --per_class)")
    return np.random.default_rng([seed, 0x1AB]).integers(0, num_classes, num_samples).astype(np.int32)


def _cubic(x, a=-0.75):
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of PyTorch's bicubic interpolation (align_corners=False, no antialias,
    border indices clamped)."""
    scale = in_size / out_size
    w = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5
        x0 = int(np.floor(src))
        t = src - x0
        for k, d in enumerate((-1, 0, 1, 2)):
            w[o, min(max(x0 + d, 0), in_size - 1)] += _cubic(t - d)
    return w.astype(np.float32)


def resize_bicubic(images, size: int):
    """[B, H, W, C] float -> [B, size, size, C] (PyTorch bicubic weights)."""
    h, w = images.shape[1:3]
    if (h, w) == (size, size):
        return images
    mh, mw = jnp.asarray(bicubic_matrix(h, size)), jnp.asarray(bicubic_matrix(w, size))
    return jnp.einsum("oh,bhwc,pw->bopc", mh, jnp.asarray(images, jnp.float32), mw)


class NpzStreamWriter:
    """Writes an .npz whose `arr_0` is filled chunk by chunk (a 50k × 256² × 3 array never sits in
    memory); readable with np.load like any npz."""

    def __init__(self, path: str, shape, dtype=np.uint8):
        self.path, self.tmp = path, path + ".tmp"
        self.zf = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.f = self.zf.open("arr_0.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(
            self.f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                     "shape": tuple(int(s) for s in shape)})
        self.dtype, self.expected, self.written = np.dtype(dtype), int(np.prod(shape)), 0

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, self.dtype)
        self.f.write(chunk.tobytes())
        self.written += chunk.size

    def close(self, **extra: np.ndarray) -> None:
        self.f.close()
        if self.written != self.expected:
            raise RuntimeError(f"npz writer got {self.written} values, expected {self.expected}")
        for name, arr in extra.items():
            with self.zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arr))
        self.zf.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drops the unfinished file (nothing to do after close)."""
        if os.path.exists(self.tmp):
            self.f.close()
            self.zf.close()
            os.remove(self.tmp)


# ----------------------------------------------------------------------------------------------
# Sharded sampler


def make_sharded_sampler(step_fns: StepFns, spec: SamplerSpec, mesh, param_shardings=None):
    """jit(params, labels [G], ids [G], key) -> ids [G, T, K], batch-sharded over (data, fsdp).

    Only the inputs and outputs carry shardings (params as given, rows over the batch axes); the
    partitioner propagates them. No mesh context is entered: under one, Flax's apply-time param
    shape check re-runs DenseGeneral's init and trips over the logical constraint of its
    flattened kernel.
    """
    from jax.sharding import NamedSharding, PartitionSpec as P

    from iar_jax import sharding

    batch = sharding.batch_sharding(mesh)
    rep = NamedSharding(mesh, P())

    def fn(params, labels, ids, key):
        return sample_tokens(step_fns, spec, params, labels, ids, key)

    return jax.jit(fn, in_shardings=(param_shardings, batch, batch, rep), out_shardings=sharding.batch_sharding(mesh, 2))


def _process_slice(x: np.ndarray) -> np.ndarray:
    n = jax.process_count()
    per = x.shape[0] // n
    i = jax.process_index()
    return x[i * per:(i + 1) * per]


def _to_global(x: np.ndarray, mesh):
    from iar_jax import sharding

    return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, x.ndim - 1), _process_slice(x))


def _gather(x) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _sync(x: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(x))


# ----------------------------------------------------------------------------------------------
# Driver


def generate(sample_fn: Callable, params, labels: np.ndarray, out_dir: str, *, global_batch: int, mesh,
             decode_fn: Callable, num_classes: int, seed: int = 0, resize: int = 0, grid: int = 64,
             settings: Optional[Dict[str, Any]] = None, progress: bool = True) -> Dict[str, Any]:
    """Samples len(labels) images in chunks of `global_batch` (resumable) and writes the outputs.

    sample_fn(params, labels [G], ids [G], key) -> codes [G, T, K] (e.g. `make_sharded_sampler`);
    decode_fn(codes [G, T, K]) -> images [G, H, W, 3] in [-1, 1] (injectable: tests pass a fake).
    `settings` (JSON-able) is stored in run.json; resuming with different settings is an error.
    """
    from iar_jax import sharding

    labels = np.asarray(labels, np.int32)
    check_labels(labels, num_classes)
    n = int(labels.shape[0])
    dp = sharding.data_parallel_size(mesh)
    if global_batch % dp or global_batch % jax.process_count():
        raise ValueError(f"global batch {global_batch} is not divisible by the data-parallel size {dp} and the "
                         f"{jax.process_count()} processes; use a multiple of {dp * jax.process_count()}")
    num_chunks = -(-n // global_batch)
    chunk_dir = os.path.join(out_dir, "chunks")
    run = {"num_samples": n, "global_batch": global_batch, "seed": seed, "resize": resize,
           "labels_sha1": hashlib.sha1(labels.tobytes()).hexdigest(), "settings": settings or {}}
    if jax.process_index() == 0:
        os.makedirs(chunk_dir, exist_ok=True)
        _check_run(os.path.join(out_dir, "run.json"), run)
    done = np.array([_chunk_ok(chunk_dir, c, global_batch, n) for c in range(num_chunks)]) \
        if jax.process_index() == 0 else np.zeros((num_chunks,), bool)
    done = _sync(done)
    todo = [c for c in range(num_chunks) if not done[c]]
    logging.info("%d samples in %d chunks of %d: %d done, %d to go", n, num_chunks, global_batch,
                 num_chunks - len(todo), len(todo))
    key = jax.random.key(seed)
    bar = tqdm(total=len(todo), desc="sampling chunks", unit="chunk",
               disable=not (progress and todo and jax.process_index() == 0))
    for c in todo:
        ids = np.arange(c * global_batch, (c + 1) * global_batch)
        real = ids < n
        lab = np.where(real, labels[np.minimum(ids, n - 1)], 0).astype(np.int32)  # pad, trimmed below
        ids_arr = _to_global(ids.astype(np.int32), mesh)
        codes = sample_fn(params, _to_global(lab, mesh), ids_arr, key)
        images = decode_fn(codes)
        if resize:
            images = resize_bicubic(images, resize)
        # Rows come back in global-array order; order them by sample id (robust to any device
        # order of the hosts' slices).
        order = np.argsort(_gather(ids_arr), kind="stable")
        images = to_uint8(_gather(images))[order][real]
        codes = _gather(codes)[order][real]
        if jax.process_index() == 0:
            path = _chunk_path(chunk_dir, c)
            tmp = path + ".tmp.npz"
            np.savez(tmp, images=images, labels=lab[real], ids=ids[real], codes=codes)
            os.replace(tmp, path)
        bar.update(1)
    bar.close()
    summary = {"num_samples": n, "chunks": num_chunks, "sampled_chunks": len(todo)}
    if jax.process_index() == 0:
        summary.update(_assemble(out_dir, chunk_dir, num_chunks, n, grid))
    return summary


def _chunk_path(chunk_dir: str, c: int) -> str:
    return os.path.join(chunk_dir, f"chunk_{c:06d}.npz")


def _set_aside(path: str, error: Exception) -> str:
    """Moves an unreadable chunk out of the way (kept, in case it matters to someone)."""
    aside = path + ".corrupt"
    os.replace(path, aside)
    logging.warning("sampling chunk %s is unreadable (%s: %s); moved it to %s, it is sampled again", path,
                    type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "", aside)
    return aside


def _chunk_ok(chunk_dir: str, c: int, global_batch: int, n: int) -> bool:
    """Whether chunk c exists and reads as the expected samples (zip directory, keys, ids)."""
    path = _chunk_path(chunk_dir, c)
    if not os.path.exists(path):
        return False
    try:
        with np.load(path) as z:  # a truncated zip fails here: its directory is at the end
            missing = {"images", "labels", "ids", "codes"} - set(z.files)
            if missing:
                raise ValueError(f"lacks {sorted(missing)}")
            if not np.array_equal(z["ids"], np.arange(c * global_batch, min((c + 1) * global_batch, n))):
                raise ValueError("holds other sample ids")
    except Exception as e:  # noqa: BLE001 - any unreadable chunk is redone
        _set_aside(path, e)
        return False
    return True


def _check_run(path: str, run: Dict[str, Any]) -> None:
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != json.loads(json.dumps(run)):
            diff = sorted(k for k in set(old) | set(run) if old.get(k) != json.loads(json.dumps(run)).get(k))
            raise ValueError(f"{os.path.dirname(path)} holds samples made with other settings ({', '.join(diff)}); "
                             "use a fresh --out directory or the original settings")
        return
    with open(path, "w") as f:
        json.dump(run, f, indent=1, sort_keys=True)


def _assemble(out_dir: str, chunk_dir: str, num_chunks: int, n: int, grid: int) -> Dict[str, Any]:
    writer, labels, grid_imgs = None, [], []
    try:
        for c in range(num_chunks):
            path = _chunk_path(chunk_dir, c)
            try:
                with np.load(path) as z:
                    images, lab = z["images"], z["labels"]
            except Exception as e:  # e.g. a CRC error the startup check cannot see
                aside = _set_aside(path, e)
                raise ValueError(f"sampling chunk {path} is unreadable; moved it to {aside}: run the same command "
                                 "again to sample it again") from None
            if writer is None:
                shape = (n,) + images.shape[1:]
                writer = NpzStreamWriter(os.path.join(out_dir, "samples.npz"), shape)
            writer.write(images)
            labels.append(lab)
            if sum(len(g) for g in grid_imgs) < grid:
                grid_imgs.append(images[: grid - sum(len(g) for g in grid_imgs)])
        labels = np.concatenate(labels)
        writer.close(arr_1=labels, labels=labels)  # arr_1: what `iar-jax evaluate` and the ADM tools read
    finally:
        if writer is not None:
            writer.abort()  # no-op once closed; else drops the partial samples.npz.tmp
    if grid > 0:
        g = np.concatenate(grid_imgs)
        save_grid(os.path.join(out_dir, "grid.png"), g, ncols=int(np.ceil(np.sqrt(len(g)))))
    return {"npz": os.path.join(out_dir, "samples.npz"), "image_shape": list(shape[1:])}


# ----------------------------------------------------------------------------------------------
# Settings and tokenizer glue (used by `iar-jax sample`)


def _split(value, n: int, name: str, cast):
    parts = [p for p in str(value).split(",") if p != ""] if value is not None else []
    if not parts:
        return [None] * n
    if len(parts) == 1:
        parts = parts * n
    if len(parts) != n:
        raise ValueError(f"--{name} has {len(parts)} values but the model draws {n} sub-tokens; give 1 or {n}")
    return [cast(p) for p in parts]


def make_spec(sub_tokens, guidance: str = "constant", cfg_scale=None, cfg_start=None, cfg_end=None, w_attn=None,
              cfg_tokens=None, temperature="1.0", top_k="0", top_p="1.0") -> SamplerSpec:
    """Flag values (one value, or one per sub-token, comma-separated) -> a validated SamplerSpec."""
    from iar_jax.sampling import guidance as g
    from iar_jax.sampling.filtering import SamplingConfig
    from iar_jax.sampling.sampler import SubToken

    k = len(sub_tokens)
    kinds = _split(guidance, k, "guidance", str)
    cols = {name: _split(v, k, name, float) for name, v in
            (("scale", cfg_scale), ("start", cfg_start), ("end", cfg_end), ("w_attn", w_attn))}
    cols["num_tokens"] = _split(cfg_tokens, k, "cfg_tokens", int)
    temps, tks, tps = _split(temperature, k, "temperature", float), _split(top_k, k, "top_k", int), \
        _split(top_p, k, "top_p", float)
    subs = []
    for j, name in enumerate(sub_tokens):
        kind = kinds[j] or "constant"
        d = {"kind": kind}
        needed = {"constant": ("scale",), "interval": ("scale", "num_tokens"), "linear": ("start", "end"),
                  "attention": ("start", "end", "w_attn")}.get(kind, ())
        d.update({key: cols[key][j] for key in needed})
        sched = g.from_dict(d, what=f"guidance[{name}]")
        samp = SamplingConfig(1.0 if temps[j] is None else temps[j], 0 if tks[j] is None else tks[j],
                              1.0 if tps[j] is None else tps[j])
        subs.append(SubToken(sched, samp.validate(what=f"sampling[{name}]")))
    return SamplerSpec(tuple(subs))


def check_vocab(model_vocab, tokenizer_vocab) -> None:
    """One-line error when the AR model's vocabulary does not match the tokenizer's codebook(s)."""
    if tuple(model_vocab) != tuple(tokenizer_vocab):
        raise ValueError(f"the config's model has vocab {tuple(model_vocab)} (config.model.vocab_size) but the "
                         f"tokenizer has {tuple(tokenizer_vocab)} codes; pass the config the model was trained "
                         "with (its WORKDIR/config.json, e.g. configs/iar.py:tiny,grid=7,vocab=512 for the demo) "
                         "and the tokenizer it was trained on")


def vq_decoder(vq_cfg, vq_params) -> Callable:
    """The tokenizer's decoder as codes [G, h, w] (dual: a (semantic, detail) pair) -> images in [-1, 1]."""
    from iar_jax.tokenizer.vq_model import VQModel, build_model

    model = build_model(vq_cfg)
    fn = jax.jit(lambda p, c: jnp.clip(model.apply({"params": p}, c, method=VQModel.decode), -1.0, 1.0))
    return lambda codes: fn(vq_params, codes)


def make_decode_fn(decoder: Callable, grid_size: int, dual: bool = False, new_order: Optional[np.ndarray] = None):
    """codes [G, T, K] (model ids) -> images [G, H, W, 3] in [-1, 1] through `decoder` (see `vq_decoder`).

    IAR models predict REARRANGED ids: `new_order` (new id -> original id, i.e. argsort of the
    mapping) takes them back to the original codebook before decoding.
    """
    order = None if new_order is None else jnp.asarray(new_order, jnp.int32)

    @jax.jit
    def to_codes(codes):
        codes = codes.reshape(codes.shape[0], grid_size, grid_size, codes.shape[-1])
        if dual:
            return codes[..., 0], codes[..., 1]
        return codes[..., 0] if order is None else order[codes[..., 0]]

    return lambda codes: decoder(to_codes(jnp.asarray(codes)))


def parse_checkpoint(value: str):
    """'latest' | 'STEP' | 'ema' | 'STEP:ema' -> (step or None, ema)."""
    v = (value or "latest").strip().lower()
    step, _, tag = v.partition(":")
    if step in ("ema", "latest", ""):
        step, tag = None, (step if step == "ema" else tag)
    else:
        if not step.isdigit():
            raise ValueError(f"--checkpoint={value!r} is not latest, a step number, ema or STEP:ema")
        step = int(step)
    if tag not in ("", "ema", "latest"):
        raise ValueError(f"--checkpoint={value!r}: after ':' only 'ema' is allowed")
    return step, tag == "ema"


# ----------------------------------------------------------------------------------------------
# A trained model in, samples out (`iar-jax sample`, the demo)


def load_model_params(workdir: str, checkpoint: str, expect_meta, shardings=None):
    """(params, meta) of a train workdir or `iar-jax convert` output; `checkpoint` as parse_checkpoint.
    Only the params are read, straight into `shardings` (see checkpointing.load_params)."""
    from iar_jax import checkpointing

    step, ema = parse_checkpoint(checkpoint)
    return checkpointing.load_params(workdir, expect_meta, ema=ema, step=step, shardings=shardings)


def model_param_shardings(config, family, module, mesh):
    """The model's parameter shardings on `mesh`, from its logical axis names."""
    from iar_jax import sharding

    dummy = {k: jnp.zeros((1,) + tuple(s), d) for k, (s, d) in family.batch_spec(config).items()}
    # Logical names only (no mesh context: shapes are traced, nothing is placed yet).
    boxed = jax.eval_shape(lambda r: family.init(module, r, dummy), jax.random.PRNGKey(0))["params"]
    return sharding.logical_shardings(boxed, mesh, config.mesh)


def build_sampling(config, tokenizer: str, mesh, mapping_file: str = "", **spec_args):
    """(spec, sample_fn, decode_fn, param_shardings) for the model `config` describes: the family's
    sampler step with `make_spec(**spec_args)`, sharded on `mesh`, and the tokenizer's decoder
    (IAR ids mapped back through `mapping_file` first). Checks the tokenizer's vocab against the model's."""
    from iar_jax.models.families import get_family
    from iar_jax.models.iar import load_mapping
    from iar_jax.tokenizer.checkpoint import load_tokenizer

    family = get_family(config.model_family)
    if family.sampling_step is None:
        raise ValueError(f"model family {family.name!r} has no sampler step; use an IAR or IAR2 config")
    module, model_cfg = family.build(config)
    step_fns = family.sampling_step(module, model_cfg, True)
    spec = make_spec(step_fns.sub_tokens, **spec_args)
    spec.validate(step_fns.vocab_sizes or None, step_fns.sub_tokens)

    vq_cfg, vq_params = load_tokenizer(tokenizer)
    model_vocab = (config.model.vocab_size,) + ((config.model.detail_vocab_size,) if vq_cfg.dual and
                                                "detail_vocab_size" in config.model else ())
    check_vocab(model_vocab, vq_cfg.vocab_sizes)
    new_order = None
    if mapping_file and not vq_cfg.dual:
        new_order = np.argsort(load_mapping(mapping_file, int(config.model.vocab_size)))
    param_shardings = model_param_shardings(config, family, module, mesh)
    sample_fn = make_sharded_sampler(step_fns, spec, mesh, param_shardings)
    decode_fn = make_decode_fn(vq_decoder(vq_cfg, jax.device_put(vq_params)), int(config.model.grid_size),
                               vq_cfg.dual, new_order)
    return spec, sample_fn, decode_fn, param_shardings


def sample_from_workdir(config, workdir: str, tokenizer: str, out_dir: str, labels: np.ndarray, *,
                        checkpoint: str = "latest", mapping_file: Optional[str] = None, guidance: str = "constant",
                        cfg_scale="2.0", cfg_start=None, cfg_end=None, w_attn=None, cfg_tokens=None,
                        temperature="1.0", top_k="0", top_p="1.0", global_batch: int = 0, seed: int = 0,
                        resize: int = 0, grid: int = 64, settings: Optional[Dict[str, Any]] = None,
                        progress: bool = True) -> Dict[str, Any]:
    """Samples one image per label from the model in `workdir` into `out_dir` (see `generate`).

    Sampling settings take one value or one per sub-token, as the `iar-jax sample` flags.
    `mapping_file` None means config.loss.mapping_file ('' = none): IAR ids are mapped back to the
    original codebook before decoding. `global_batch` 0 = 32 per device.
    """
    from iar_jax import sharding
    from iar_jax.trainer import structural_model_meta

    if mapping_file is None:
        mapping_file = config.get("loss", {}).get("mapping_file", "")
    mesh = sharding.make_mesh(config.mesh)
    spec, sample_fn, decode_fn, param_shardings = build_sampling(
        config, tokenizer, mesh, mapping_file, guidance=guidance, cfg_scale=cfg_scale, cfg_start=cfg_start,
        cfg_end=cfg_end, w_attn=w_attn, cfg_tokens=cfg_tokens, temperature=temperature, top_k=top_k, top_p=top_p)

    expect = {"model_family": config.model_family, "model": structural_model_meta(config)}
    params, meta = load_model_params(workdir, checkpoint, expect, param_shardings)
    logging.info("model params from %s (%s)", workdir, {k: meta.get(k) for k in ("kind", "step", "source")})
    global_batch = global_batch or 32 * jax.device_count()
    run_settings = {"checkpoint": checkpoint, "step": meta.get("step"), "spec": repr(spec),
                    "tokenizer": os.path.abspath(tokenizer), **(settings or {})}
    return generate(sample_fn, params, labels, out_dir, global_batch=global_batch, mesh=mesh, decode_fn=decode_fn,
                    num_classes=int(config.model.num_classes), seed=seed, resize=resize, grid=grid,
                    settings=run_settings,
                    progress=progress)
