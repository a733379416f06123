"""Tokenizer training: LlamaGen's VQ-GAN recipe and IAR2's two-stage dual-codebook recipe.

Generator loss (reference `VQLoss`, optimizer_idx 0):
    rec_w · L2|L1(x, x̂) + lpips_w · LPIPS(x, x̂) + adopt(disc_w) · G_adv(D(x̂)) + vq + commit + entropy
Discriminator loss (optimizer_idx 1): adopt(disc_w) · hinge(D(x), D(sg(x̂))), with its own Adam.
`adopt` is 0 until `disc_start` (the reference passes global_step = step + 1).
Adam(lr, β1, β2) with PyTorch-style gradient clipping (coef = max / (norm + 1e-6), capped at 1).

IAR2 (SPEC §2):
  * stage 1 (`stage1_steps`): semantic codebook only, loss without the pixel term
    (`stage1_reconstruction_weight`, 0 in the reference); the detail codebook is frozen.
  * stage 2: cycles of two "dual" iterations then one "semantic" iteration. Every iteration
    updates the encoder/decoder and C_D with the dual loss, each group clipped on its own. C_S is
    updated only on the semantic iteration, with clip(g1) + g2 where g1 is its gradient under the
    semantic (stage-1) loss and g2 under the dual loss of that iteration — the reference
    backpropagates both losses into C_S and clips after the first. Because of the straight-through
    estimator, C_S's gradient of the semantic loss comes from its codebook terms only, so g1 is
    computed from the quantizer on this iteration's latents (same value, no second forward pass).
    Gating uses an optax transform (`gated`), so C_S's Adam moments and step count advance only on
    semantic iterations, exactly like the reference's separate optimizer.
  Fresh optimizers start stage 2, like the reference's second training script.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from iar_jax.tokenizer import discriminator as disc_lib
from iar_jax.runtime import NonFiniteLossError, Preemption
from iar_jax.tokenizer.quantizer import DualQuantizer, codebook_usage
from iar_jax.tokenizer.vq_model import VQConfig, VQModel, build_model, check_images

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    reconstruction_loss: str = "l2"  # l2 | l1
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0  # LPIPS; 0 switches it off
    disc_weight: float = 0.5  # 0 switches the discriminator off entirely
    disc_start: int = 20000
    disc_loss: str = "hinge"  # hinge | vanilla
    gen_loss: str = "hinge"  # hinge | non-saturating
    disc_dim: int = 64
    disc_num_layers: int = 3
    stage1_reconstruction_weight: float = 0.0  # IAR2 stage 1: no pixel loss in the reference

    def validate(self) -> "LossConfig":
        if self.reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"loss.reconstruction_loss {self.reconstruction_loss!r} is not supported; use 'l2' or 'l1'")
        if self.disc_loss not in disc_lib.D_LOSSES:
            raise ValueError(f"loss.disc_loss {self.disc_loss!r} is not supported; use one of {sorted(disc_lib.D_LOSSES)}")
        if self.gen_loss not in disc_lib.G_LOSSES:
            raise ValueError(f"loss.gen_loss {self.gen_loss!r} is not supported; use one of {sorted(disc_lib.G_LOSSES)}")
        return self


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    stage1_steps: int = 0  # IAR2 only: semantic-only steps before the dual stage
    dual_iters: int = 2  # stage-2 cycle: this many dual iterations ...
    semantic_iters: int = 1  # ... then this many semantic (C_S-updating) iterations
    usage_window: int = 65536  # codes remembered for the usage metric (reference buffer length)


# ------------------------------------------------------------------------------------------------
# Optimizer pieces
# ------------------------------------------------------------------------------------------------


class GatedState(NamedTuple):
    inner: Any
    count: Array


def gated(inner: optax.GradientTransformation, active: Callable[[Array], Array]) -> optax.GradientTransformation:
    """Applies `inner` only on the updates where `active(count)` holds; otherwise the params stay and
    `inner`'s state (Adam moments and step count) is left untouched."""

    def init(params):
        return GatedState(inner.init(params), jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        on = active(state.count)
        new_updates, new_inner = inner.update(updates, state.inner, params)
        new_updates = jax.tree_util.tree_map(lambda u: jnp.where(on, u, jnp.zeros_like(u)), new_updates)
        new_inner = jax.tree_util.tree_map(lambda n, o: jnp.where(on, n, o), new_inner, state.inner)
        return new_updates, GatedState(new_inner, state.count + 1)

    return optax.GradientTransformation(init, update)


def semantic_iteration(stage2_step: Array, recipe: RecipeConfig) -> Array:
    """Stage-2 iteration s is a semantic one iff it is in the tail of its (dual, semantic) cycle."""
    cycle = recipe.dual_iters + recipe.semantic_iters
    return (stage2_step % cycle) >= recipe.dual_iters


def param_labels(params) -> Any:
    """'semantic' for quantize/embedding, 'detail' for quantize/embedding_second, 'main' otherwise."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    lab = {}
    for path in flat:
        if path[:2] == ("quantize", "embedding"):
            lab[path] = "semantic"
        elif path[:2] == ("quantize", "embedding_second"):
            lab[path] = "detail"
        else:
            lab[path] = "main"
    return flax.traverse_util.unflatten_dict(lab)


def make_generator_tx(optim: OptimConfig, dual: bool, stage: int, recipe: RecipeConfig):
    """Adam for the VQ params. Dual: one gated Adam per group (same state layout in both stages)."""
    adam = lambda: optax.adam(optim.lr, optim.beta1, optim.beta2, eps=1e-8)
    if not dual:
        return adam()
    always = lambda c: jnp.asarray(True)
    never = lambda c: jnp.asarray(False)
    if stage == 1:
        txs = {"semantic": gated(adam(), always), "detail": gated(adam(), never), "main": gated(adam(), always)}
    else:
        txs = {
            "semantic": gated(adam(), lambda c: semantic_iteration(c, recipe)),
            "detail": gated(adam(), always),
            "main": gated(adam(), always),
        }
    return optax.multi_transform(txs, param_labels)


def torch_clip(grads, max_norm: float):
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max / (norm + 1e-6)); returns (grads, norm)."""
    norm = optax.global_norm(grads)
    if not max_norm:
        return grads, norm
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree_util.tree_map(lambda g: g * coef, grads), norm


def _split(tree, labels, want):
    return jax.tree_util.tree_map(lambda x, l: x if l == want else jnp.zeros_like(x), tree, labels)


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------


def _rec_loss(kind: str, x, y):
    d = x.astype(jnp.float32) - y.astype(jnp.float32)
    return jnp.mean(jnp.abs(d)) if kind == "l1" else jnp.mean(d * d)


class TokenizerTrainer:
    """Builds the model, discriminator, optimizers and the jitted step for one config."""

    def __init__(
        self,
        model_cfg: VQConfig,
        loss_cfg: LossConfig = LossConfig(),
        optim_cfg: OptimConfig = OptimConfig(),
        recipe: RecipeConfig = RecipeConfig(),
        lpips_params=None,
        mesh=None,
    ):
        self.model_cfg = model_cfg.validate()
        self.loss_cfg = loss_cfg.validate()
        self.optim_cfg = optim_cfg
        self.recipe = recipe
        if not model_cfg.dual and recipe.stage1_steps:
            raise ValueError("recipe.stage1_steps is for the dual (IAR2) tokenizer; set it to 0 or use model.dual=True")
        if loss_cfg.perceptual_weight and lpips_params is None:
            raise ValueError(
                "LPIPS is on (loss.perceptual_weight > 0) but no LPIPS weights were given; pass the VGG16 and LPIPS "
                "linear-layer files (config.loss.lpips_vgg_path / lpips_lin_path) or set loss.perceptual_weight=0"
            )
        if loss_cfg.perceptual_weight and model_cfg.out_channels != 3:
            raise ValueError("LPIPS needs RGB reconstructions (out_channels=3); set loss.perceptual_weight=0 for other images")
        self.lpips_params = lpips_params
        self.model = build_model(model_cfg)
        self.use_disc = bool(loss_cfg.disc_weight)
        self.disc = disc_lib.PatchGANDiscriminator(loss_cfg.disc_dim, loss_cfg.disc_num_layers, model_cfg.compute_dtype)
        if lpips_params is not None:
            from iar_jax.tokenizer.lpips import LPIPS

            self.lpips = LPIPS(model_cfg.compute_dtype)
        self.mesh = mesh

    # -- state --------------------------------------------------------------------------------

    def stage_of(self, step: int) -> int:
        return 1 if (self.model_cfg.dual and step < self.recipe.stage1_steps) else 2

    def gen_tx(self, stage: int):
        return make_generator_tx(self.optim_cfg, self.model_cfg.dual, stage, self.recipe)

    def disc_tx(self):
        return optax.adam(self.optim_cfg.lr, self.optim_cfg.beta1, self.optim_cfg.beta2, eps=1e-8)

    def init_state(self, rng: Array, image_shape: Tuple[int, int, int]) -> Dict[str, Any]:
        """The train state, built by one compiled call shared by trainers with equal settings."""
        image_shape = tuple(int(d) for d in image_shape)
        check_images(self.model_cfg, (1,) + image_shape)
        if self.use_disc:
            n = self.loss_cfg.disc_num_layers
            out = min(image_shape[:2]) // 2**n - 2  # n stride-2 convs, then two 4x4 stride-1 convs
            if out < 1:
                raise ValueError(
                    f"{image_shape[0]}x{image_shape[1]} images are too small for the PatchGAN discriminator with "
                    f"disc_num_layers={n} (needs at least {3 * 2**n} px); lower loss.disc_num_layers or set loss.disc_weight=0"
                )
        key = ("init", self.model_cfg, self.loss_cfg, self.recipe, image_shape)
        if key not in _STEP_CACHE:
            _STEP_CACHE[key] = jax.jit(functools.partial(self._init_state, image_shape=image_shape))
        return _STEP_CACHE[key](rng)

    def _init_state(self, rng, image_shape):
        # An RngBitGenerator key for the ~100 initialisers compiles ~3x faster than threefry; still fixed by
        # the seed (values may differ between backends, which only matters for a fresh init).
        rng = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")
        r_model, r_disc = jax.random.split(rng)
        x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
        params = self.model.init({"params": r_model}, x)["params"]
        stage = self.stage_of(0)
        state = {
            "step": jnp.zeros([], jnp.int32),
            "params": params,
            "opt_state": self.gen_tx(stage).init(params),
            "recent_codes": jnp.zeros((len(self.model_cfg.vocab_sizes), self.recipe.usage_window), jnp.int32),
        }
        if self.use_disc:
            img = jnp.zeros((2,) + tuple(image_shape[:2]) + (self.model_cfg.out_channels,), jnp.float32)
            dvars = self.disc.init({"params": r_disc}, img, train=False)
            state["disc_params"] = dvars["params"]
            state["disc_stats"] = dvars["batch_stats"]
            state["disc_opt_state"] = self.disc_tx().init(dvars["params"])
        return state

    def reset_for_stage2(self, state):
        """Fresh generator optimizer at the start of IAR2 stage 2 (and a fresh D optimizer)."""
        key = ("reset", self.model_cfg, self.loss_cfg, self.optim_cfg, self.recipe)
        if key not in _STEP_CACHE:

            def reset(params, disc_params):
                return self.gen_tx(2).init(params), (self.disc_tx().init(disc_params) if self.use_disc else None)

            _STEP_CACHE[key] = jax.jit(reset)
        state = dict(state)
        opt, dopt = _STEP_CACHE[key](state["params"], state.get("disc_params"))
        # Same placement as the rest of the state, so the step function is not recompiled for it.
        like = jax.tree_util.tree_leaves(state["params"])[0].sharding
        opt, dopt = jax.device_put((opt, dopt), like)
        state["opt_state"] = opt
        if self.use_disc:
            state["disc_opt_state"] = dopt
        return state

    # -- losses -------------------------------------------------------------------------------

    def _generator_loss(self, params, disc_vars, lpips_params, images, step, rng, mode, rec_weight):
        lc = self.loss_cfg
        recon, q = self.model.apply({"params": params}, images, train=True, mode=mode, rngs={"dropout": rng})
        rec = _rec_loss(lc.reconstruction_loss, images, recon)
        loss = rec_weight * rec + q.loss
        metrics = {"rec_loss": rec, "vq_loss": q.vq_loss, "commit_loss": q.commit_loss, "entropy_loss": q.entropy_loss}
        if lc.perceptual_weight:
            p = jnp.mean(self.lpips.apply({"params": lpips_params}, images, recon))
            loss = loss + lc.perceptual_weight * p
            metrics["perceptual_loss"] = p
        new_stats = None
        if self.use_disc:
            logits_fake, upd = self.disc.apply(disc_vars, recon, train=True, mutable=["batch_stats"])
            g_adv = disc_lib.G_LOSSES[lc.gen_loss](logits_fake)
            w = disc_lib.adopt_weight(lc.disc_weight, step, lc.disc_start)
            loss = loss + w * g_adv
            metrics["gen_adv_loss"] = g_adv
            new_stats = upd["batch_stats"]
        metrics["loss"] = loss
        return loss, (metrics, recon, q.codes, new_stats, jax.lax.stop_gradient(q.z))

    def _semantic_codebook_loss(self, quantize_params, z):
        """The codebook terms of the semantic (stage-1) loss for latents z: all of that loss's C_S gradient,
        because the straight-through estimator stops every other path into the codebook."""
        mc = self.model_cfg
        q = DualQuantizer(mc.semantic_codebook_size, mc.codebook_size, mc.codebook_embed_dim, mc.commit_loss_beta,
                          mc.entropy_loss_ratio, mc.codebook_l2_norm)
        return q.apply({"params": quantize_params}, z, mode="semantic").loss

    def _disc_update(self, state, images, recon, step):
        lc, oc = self.loss_cfg, self.optim_cfg
        recon = jax.lax.stop_gradient(recon)

        def d_loss(dp):
            stats = state["disc_stats"]
            real, upd = self.disc.apply({"params": dp, "batch_stats": stats}, images, train=True, mutable=["batch_stats"])
            fake, upd = self.disc.apply({"params": dp, "batch_stats": upd["batch_stats"]}, recon, train=True,
                                        mutable=["batch_stats"])
            w = disc_lib.adopt_weight(lc.disc_weight, step, lc.disc_start)
            loss = w * disc_lib.D_LOSSES[lc.disc_loss](real, fake)
            return loss, (upd["batch_stats"], jnp.mean(real), jnp.mean(fake))

        (loss, (stats, lr_, lf_)), g = jax.value_and_grad(d_loss, has_aux=True)(state["disc_params"])
        g, gnorm = torch_clip(g, oc.max_grad_norm)
        upd, opt = self.disc_tx().update(g, state["disc_opt_state"], state["disc_params"])
        new = dict(state)
        new["disc_params"] = optax.apply_updates(state["disc_params"], upd)
        new["disc_opt_state"] = opt
        new["disc_stats"] = stats
        return new, {"disc_loss": loss, "logits_real": lr_, "logits_fake": lf_, "disc_grad_norm": gnorm}

    # -- steps --------------------------------------------------------------------------------

    def _train_step(self, state, images, rng, lpips_params, stage: int):
        mc, lc, oc = self.model_cfg, self.loss_cfg, self.optim_cfg
        step = state["step"]
        params = state["params"]
        disc_vars = {"params": state["disc_params"], "batch_stats": state["disc_stats"]} if self.use_disc else None
        if mc.dual and stage == 1:
            mode, rec_w = "semantic", lc.stage1_reconstruction_weight
        else:
            mode, rec_w = ("dual" if mc.dual else None), lc.reconstruction_weight
        grad_fn = jax.value_and_grad(self._generator_loss, has_aux=True)
        # IAR2's stage 2 is launched with --finetune, which restarts the step count seen by disc_start.
        gan_step = step - self.recipe.stage1_steps if (mc.dual and stage == 2) else step
        (_, (metrics, recon, codes, new_stats, z)), grads = grad_fn(
            params, disc_vars, lpips_params, images, gan_step, rng, mode, rec_w)

        if mc.dual and stage == 2:
            labels = param_labels(params)
            g_main, n_main = torch_clip(_split(grads, labels, "main"), oc.max_grad_norm)
            g_det, _ = torch_clip(_split(grads, labels, "detail"), oc.max_grad_norm)
            is_sem = semantic_iteration(step - self.recipe.stage1_steps, self.recipe)
            # The semantic loss of this iteration (same params, same latents z): its C_S gradient g1 is
            # clipped on its own, then the dual loss's g2 is added, as the reference accumulates them.
            # Computed every iteration (it is cheap); the gated optimizer uses it on semantic ones only.
            g1 = jax.grad(self._semantic_codebook_loss)(params["quantize"], z)["embedding"]
            g1, _ = torch_clip(g1, oc.max_grad_norm)
            g_sem = _split(grads, labels, "semantic")
            g_sem["quantize"] = dict(g_sem["quantize"], embedding=g_sem["quantize"]["embedding"] + g1)
            grads = jax.tree_util.tree_map(lambda a, b, c: a + b + c, g_main, g_det, g_sem)
            metrics["grad_norm"] = n_main
            metrics["semantic_iteration"] = is_sem.astype(jnp.float32)
        else:
            grads, metrics["grad_norm"] = torch_clip(grads, oc.max_grad_norm)

        updates, opt_state = self.gen_tx(stage).update(grads, state["opt_state"], params)
        new = dict(state)
        new["params"] = optax.apply_updates(params, updates)
        new["opt_state"] = opt_state
        if self.use_disc:
            new["disc_stats"] = new_stats
            new, dm = self._disc_update(new, images, recon, gan_step)
            metrics.update(dm)

        # Rolling window of recent codes, like the reference's `codebook_used` buffer.
        code_list = codes if isinstance(codes, tuple) else (codes,)
        recent = state["recent_codes"]
        rows = []
        for i in range(recent.shape[0]):
            if i >= len(code_list):  # IAR2 stage 1: no detail codes yet
                rows.append(recent[i])
                continue
            c = code_list[i].reshape(-1).astype(jnp.int32)
            w = recent.shape[1]
            rows.append(jnp.concatenate([recent[i], c])[-w:] if c.shape[0] < w else c[-w:])
        new["recent_codes"] = jnp.stack(rows)
        for i, n in enumerate(mc.vocab_sizes):
            if mc.dual and stage == 1 and i == 1:
                continue
            used = jnp.sum(jnp.bincount(new["recent_codes"][i], length=n) > 0)
            metrics[f"usage{'' if i == 0 else i + 1}"] = used / n
        new["step"] = step + 1
        return new, metrics

    def step_fn(self, stage: int):
        """The jitted step, shared by all trainers with equal settings (compiled once per process)."""
        key = (self.model_cfg, self.loss_cfg, self.optim_cfg, self.recipe, stage)
        if key not in _STEP_CACHE:
            fn = functools.partial(self._train_step, stage=stage)
            _STEP_CACHE[key] = jax.jit(fn, donate_argnums=(0,))
        return _STEP_CACHE[key]

    def train_step(self, state, images, rng):
        """One step; picks the stage from the host-side step counter."""
        stage = self.stage_of(int(state["step"]))
        return self.step_fn(stage)(state, images, rng, self.lpips_params)


# Init / step functions depend only on the (frozen, hashable) settings, so equal trainers share them.
_STEP_CACHE: Dict[Any, Callable] = {}


# ------------------------------------------------------------------------------------------------
# Evaluation helpers
# ------------------------------------------------------------------------------------------------


_RECON_CACHE: Dict[Any, Callable] = {}


def make_reconstruct_fn(model: VQModel, mode: Optional[str] = None):
    """jitted (params, images) -> (reconstruction clipped to [-1, 1], codes); cached per model config."""
    key = (model.config, mode)
    if key not in _RECON_CACHE:

        @jax.jit
        def fn(params, images):
            recon, q = model.apply({"params": params}, images, train=False, mode=mode)
            return jnp.clip(recon, -1.0, 1.0), q.codes

        _RECON_CACHE[key] = fn
    return _RECON_CACHE[key]


def evaluate(model: VQModel, params, images: np.ndarray, batch_size: int = 256, mode: Optional[str] = None):
    """PSNR / SSIM / usage of reconstructions of `images` ([N, H, W, C] in [-1, 1])."""
    from iar_jax.evaluation import reconstruction as image_metrics

    fn = make_reconstruct_fn(model, mode)
    recons, codes = [], []
    for i in range(0, len(images), batch_size):
        r, c = fn(params, jnp.asarray(images[i:i + batch_size]))
        recons.append(np.asarray(r))
        codes.append(jax.tree_util.tree_map(np.asarray, c))
    recon = np.concatenate(recons)
    cfg = model.config
    out = {"psnr": image_metrics.psnr(images, recon)}
    if min(images.shape[1:3]) >= 11:  # SSIM's 11x11 window
        out["ssim"] = image_metrics.ssim(images, recon)
    if isinstance(codes[0], tuple):
        out["usage"] = codebook_usage(np.concatenate([c[0] for c in codes]), cfg.semantic_codebook_size)
        out["usage_detail"] = codebook_usage(np.concatenate([c[1] for c in codes]), cfg.codebook_size)
    else:
        n = cfg.semantic_codebook_size if cfg.dual else cfg.codebook_size
        out["usage"] = codebook_usage(np.concatenate(codes), n)
    return out, recon


# ------------------------------------------------------------------------------------------------
# The loop: resume, log, checkpoint, NaN guard
# ------------------------------------------------------------------------------------------------

CHECKPOINT_KIND = "tokenizer_train_state"


def build_trainer(config, mesh=None) -> "TokenizerTrainer":
    """TokenizerTrainer for a configs/tokenizer.py config (reads the LPIPS files if LPIPS is on)."""
    from iar_jax.tokenizer import config as cfg_lib

    loss_cfg = cfg_lib.loss_config_from(config)
    lpips_params = None
    if loss_cfg.perceptual_weight:
        from iar_jax.convert.lpips import load_lpips_params

        lpips_params = load_lpips_params(config.loss.lpips_vgg_path, config.loss.lpips_lin_path)
    else:
        logging.warning("LPIPS is off (loss.perceptual_weight=0): training without the perceptual loss")
    return TokenizerTrainer(cfg_lib.model_config_from(config), loss_cfg, cfg_lib.optim_config_from(config),
                            cfg_lib.recipe_from(config), lpips_params, mesh)


def make_image_source(config, split: Optional[str] = None, limit: Optional[int] = None,
                      channels: Optional[int] = None):
    """float32 [N, S, S, C] images for the in-memory sources (see `iar_jax.tokenizer.data`)."""
    from iar_jax.tokenizer import data as data_lib

    d = config.data
    if d.name == "image_folder":  # evaluation images: centre crops of the first files of data.eval_path
        if not d.get("eval_path"):
            raise ValueError("data.name=image_folder needs data.eval_path (a folder of held-out images) for "
                             "evaluation; set --config.data.eval_path or --config.data.eval_images=0")
        return data_lib.load_image_files(d.eval_path, int(d.image_size), limit, int(channels or config.model.in_channels))
    return data_lib.load_images(d.name, split or d.split, int(channels or config.model.in_channels),
                                int(d.image_size), d.path or None, limit)


def _meta(trainer: TokenizerTrainer) -> Dict[str, Any]:
    from iar_jax.tokenizer.config import model_meta

    return {"kind": CHECKPOINT_KIND, "model_family": "tokenizer", "model": model_meta(trainer.model_cfg),
            "use_disc": trainer.use_disc}


def train_and_evaluate(config, workdir: Optional[str], images: Optional[np.ndarray] = None,
                       eval_images: Optional[np.ndarray] = None, num_steps: Optional[int] = None,
                       log_fn: Optional[Callable[[int, Dict[str, float]], None]] = None, devices=None,
                       step_fn: Optional[Callable[[int, Dict[str, Any]], None]] = None):
    """Trains (resuming from `workdir/checkpoints`, if a workdir is given) and evaluates.

    Returns (trainer, state, eval_metrics). Without a workdir nothing is written (benchmarks, tests).
    `log_fn(step, mean_metrics)` is called at every log interval, `step_fn(step, device_metrics)`
    after every step; `devices` defaults to all devices. `trainer.preempted` tells a run stopped by
    SIGTERM (after saving) from a finished one.
    """
    from iar_jax import checkpointing

    if not workdir:
        return _train_and_evaluate(config, workdir, images, eval_images, num_steps, log_fn, devices, step_fn)
    with checkpointing.WorkdirLock(workdir):  # one writer per workdir
        return _train_and_evaluate(config, workdir, images, eval_images, num_steps, log_fn, devices, step_fn)


def _train_and_evaluate(config, workdir, images, eval_images, num_steps, log_fn, devices, step_fn):
    from iar_jax import checkpointing, sharding
    from iar_jax.tokenizer import data as data_lib

    mesh = sharding.make_mesh(config.mesh, devices)
    trainer = build_trainer(config, mesh)
    trainer.preempted = False
    total = int(num_steps or config.train.num_steps)
    gb = int(config.train.global_batch)
    sharding.check_global_batch(gb, mesh)
    seed, flip = int(config.train.seed), bool(config.data.flip)
    if images is None and config.data.name == "image_folder":
        batches = data_lib.FolderBatches(config.data.path, int(config.data.image_size), gb, seed, flip,
                                         channels=int(config.model.in_channels))
        image_shape = (int(config.data.image_size),) * 2 + (int(config.model.in_channels),)
    else:
        images = make_image_source(config) if images is None else images
        batches = data_lib.ArrayBatches(images, gb, seed, flip)
        image_shape = images.shape[1:]
    # Each host loads its slice of every global batch; the order only depends on (seed, step).
    per_host = gb // jax.process_count()
    lo = jax.process_index() * per_host

    def global_batch(step):
        return sharding.host_local_to_global(batches.batch(step, lo, lo + per_host), mesh)

    rng = jax.random.key(seed)
    state = trainer.init_state(rng, image_shape)
    state = jax.device_put(state, sharding.replicated(mesh))
    start, ckpt, meta = 0, None, _meta(trainer)
    if workdir:
        ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(config.train.keep_ckpts))
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = ckpt.restore_latest(abstract, expect_meta=meta)
        if restored is not None:
            state, _, _, start = restored
            logging.info("resumed tokenizer training from step %d in %s", start, workdir)

    writer = None
    if workdir:
        from clu import metric_writers

        writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    log_every, ckpt_every = int(config.train.log_every), int(config.train.ckpt_every)
    pending = []
    last_saved = start if start else None
    t0 = time.time()

    def flush(step):
        if not pending:
            return
        rows = jax.device_get(pending)
        for s, row in rows:
            if not np.isfinite(row["loss"]):
                where = f"step {last_saved}" if last_saved is not None else "none saved yet"
                raise NonFiniteLossError(
                    f"non-finite tokenizer loss ({row['loss']}) at step {s}; stopped without saving it (last good "
                    f"checkpoint: {where}); lower optim.lr or check the data")
        mean = {k: float(np.mean([r[k] for _, r in rows])) for k in rows[0][1]}
        pending.clear()
        mean["steps_per_sec"] = (step - start) / max(time.time() - t0, 1e-9)
        if writer is not None:
            writer.write_scalars(step, mean)
        if log_fn is not None:
            log_fn(step, mean)
        elif writer is None:
            logging.info("step %d: %s", step, {k: round(v, 5) for k, v in mean.items()})

    def save(step, force=False):
        nonlocal last_saved
        flush(step)
        if ckpt is not None:
            ckpt.save(step, state, {"step": int(step)}, meta, force=force)
            last_saved = step

    step = start
    try:
        with Preemption(log_every) as preempt:
            while step < total:
                if trainer.model_cfg.dual and step == trainer.recipe.stage1_steps and step > 0:
                    state = trainer.reset_for_stage2(state)  # fresh optimizers for stage 2, like the reference
                state, metrics = trainer.train_step(state, global_batch(step), jax.random.fold_in(rng, step))
                step += 1
                pending.append((step, metrics))
                if step_fn is not None:
                    step_fn(step, metrics)
                if step % log_every == 0 or step == total:
                    flush(step)
                if ckpt is not None and (step % ckpt_every == 0 or step == total):
                    save(step)
                if preempt.any_host(step):
                    if ckpt is not None and last_saved != step:
                        save(step, force=True)
                    logging.warning("stopped at step %d on SIGTERM; re-run the same command to resume", step)
                    trainer.preempted = True
                    return trainer, state, {}
    finally:  # also on errors: let the last good (async) save land
        if ckpt is not None:
            ckpt.close()

    results = {}
    if eval_images is not None and len(eval_images):
        mode = "dual" if trainer.model_cfg.dual else None
        params = jax.device_get(state["params"])
        results, recon = evaluate(trainer.model, params, eval_images, mode=mode)
        if workdir and jax.process_index() == 0:
            from iar_jax.evaluation import reconstruction as image_metrics

            n = int(config.train.num_grid_images)
            image_metrics.save_reconstruction_grid(os.path.join(workdir, "reconstructions.png"), eval_images[:n], recon[:n])
            with open(os.path.join(workdir, "eval.json"), "w") as f:
                json.dump({"step": step, **results}, f)
        if writer is not None:
            writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
    if writer is not None:
        writer.flush()
    return trainer, state, results
