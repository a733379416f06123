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
`train_and_evaluate` runs the stages as `train_loop` phases (the AR trainer's loop: sharded state,
resume with the data position, metrics, NaN guard, SIGTERM).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from iar_jax import checkpointing, sharding, train_loop
from iar_jax.tokenizer import discriminator as disc_lib
from iar_jax.tokenizer.config import LossConfig, OptimConfig, RecipeConfig
from iar_jax.tokenizer.quantizer import DualQuantizer, codebook_usage
from iar_jax.tokenizer.vq_model import VQConfig, VQModel, build_model, check_images

Array = jax.Array
# State entries sharded like params (Adam moments have their shapes); the rest is replicated.
_SHARDED = ("params", "opt_state", "disc_params", "disc_opt_state")


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
    """Builds the model, discriminator, optimizers and the jitted, sharded steps for one config and
    image shape on `mesh` (default: all devices as data parallel). The state is sharded like the AR
    trainer's: params, optimizer and discriminator state by `sharding.shape_logical_shardings`
    under the mesh rules (FSDP when they map 'embed' to fsdp), the batch over the data axes."""

    def __init__(
        self,
        model_cfg: VQConfig,
        loss_cfg: LossConfig = LossConfig(),
        optim_cfg: OptimConfig = OptimConfig(),
        recipe: RecipeConfig = RecipeConfig(),
        lpips_params=None,
        image_shape: Tuple[int, int, int] = (256, 256, 3),
        mesh=None,
        rules=(),
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
        self.image_shape = tuple(int(d) for d in image_shape)
        check_images(self.model_cfg, (1,) + self.image_shape)
        self.use_disc = bool(loss_cfg.disc_weight)
        if self.use_disc:
            n = loss_cfg.disc_num_layers
            if min(self.image_shape[:2]) // 2**n - 2 < 1:  # n stride-2 convs, then two 4x4 stride-1 convs
                raise ValueError(
                    f"{self.image_shape[0]}x{self.image_shape[1]} images are too small for the PatchGAN discriminator "
                    f"with disc_num_layers={n} (needs at least {3 * 2**n} px); lower loss.disc_num_layers or set "
                    "loss.disc_weight=0"
                )
        self.lpips_params = lpips_params
        self.model = build_model(model_cfg)
        self.disc = disc_lib.PatchGANDiscriminator(loss_cfg.disc_dim, loss_cfg.disc_num_layers, model_cfg.compute_dtype)
        if lpips_params is not None:
            from iar_jax.tokenizer.lpips import LPIPS

            self.lpips = LPIPS(model_cfg.compute_dtype)
        self.mesh = mesh if mesh is not None else sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
        self.rules = tuple(rules)
        self.abstract_state = jax.eval_shape(self._init_state, jax.random.PRNGKey(0))
        rep = sharding.replicated(self.mesh)
        self.state_shardings = {
            k: (sharding.shape_logical_shardings(v, self.mesh, self.rules) if k in _SHARDED else
                jax.tree_util.tree_map(lambda _: rep, v))
            for k, v in self.abstract_state.items()}
        self.batch_shardings = {"images": sharding.batch_sharding(self.mesh, 3)}
        # Compiled functions depend only on these (hashable) settings: equal trainers share them.
        self._key = (self.model_cfg, self.loss_cfg, self.optim_cfg, self.recipe, self.image_shape, self.mesh,
                     self.rules)

    # -- state --------------------------------------------------------------------------------

    def stage_of(self, step: int) -> int:
        return 1 if (self.model_cfg.dual and step < self.recipe.stage1_steps) else 2

    def gen_tx(self, stage: int):
        return make_generator_tx(self.optim_cfg, self.model_cfg.dual, stage, self.recipe)

    def disc_tx(self):
        return optax.adam(self.optim_cfg.lr, self.optim_cfg.beta1, self.optim_cfg.beta2, eps=1e-8)

    def _cached(self, name: str, make: Callable[[], Callable]) -> Callable:
        key = (name,) + self._key
        if key not in _STEP_CACHE:
            _STEP_CACHE[key] = make()
        return _STEP_CACHE[key]

    def abstract_sharded_state(self):
        return checkpointing.abstract_with_shardings(self.abstract_state, self.state_shardings)

    def init_state(self, seed: int) -> Dict[str, Any]:
        """The train state of `seed`, created already sharded."""
        init = self._cached("init", lambda: jax.jit(self._init_state, out_shardings=self.state_shardings))
        return init(jax.random.PRNGKey(seed))

    def _init_state(self, rng):
        rng, train_rng = jax.random.split(rng)
        # An RngBitGenerator key for the ~100 initialisers compiles ~3x faster than threefry; still fixed by
        # the seed (values may differ between backends, which only matters for a fresh init).
        rng = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")
        r_model, r_disc = jax.random.split(rng)
        x = jnp.zeros((1,) + self.image_shape, jnp.float32)
        params = self.model.init({"params": r_model}, x)["params"]
        state = {
            "step": jnp.zeros([], jnp.int32),
            "rng": train_rng,
            "params": params,
            "opt_state": self.gen_tx(self.stage_of(0)).init(params),
            "recent_codes": jnp.zeros((len(self.model_cfg.vocab_sizes), self.recipe.usage_window), jnp.int32),
        }
        if self.use_disc:
            img = jnp.zeros((2,) + self.image_shape[:2] + (self.model_cfg.out_channels,), jnp.float32)
            dvars = self.disc.init({"params": r_disc}, img, train=False)
            state["disc_params"] = dvars["params"]
            state["disc_stats"] = dvars["batch_stats"]
            state["disc_opt_state"] = self.disc_tx().init(dvars["params"])
        return state

    def reset_for_stage2(self, state):
        """Fresh generator optimizer at the start of IAR2 stage 2 (and a fresh D optimizer); same
        layout and shardings, so the stage-2 step takes it as is."""

        def reset(state):
            new = dict(state, opt_state=self.gen_tx(2).init(state["params"]))
            if self.use_disc:
                new["disc_opt_state"] = self.disc_tx().init(state["disc_params"])
            return new

        fn = self._cached("reset", lambda: jax.jit(reset, in_shardings=(self.state_shardings,),
                                                   out_shardings=self.state_shardings, donate_argnums=(0,)))
        return fn(state)

    def phases(self):
        """The recipe as data for `train_loop.run`: IAR2 stage 1, then stage 2 on fresh optimizers."""
        if self.model_cfg.dual and self.recipe.stage1_steps:
            return [train_loop.Phase(0, self.step_fn(1)),
                    train_loop.Phase(self.recipe.stage1_steps, self.step_fn(2), self.reset_for_stage2)]
        return [train_loop.Phase(0, self.step_fn(2))]

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

    def _train_step(self, state, batch, lpips_params, stage: int):
        mc, lc, oc = self.model_cfg, self.loss_cfg, self.optim_cfg
        images, step = batch["images"], state["step"]
        rng = jax.random.fold_in(state["rng"], step)
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

    def step_fn(self, stage: int) -> Callable:
        """(state, batch) -> (state, metrics) of `stage`: jitted with the state and batch shardings,
        donating the old state (compiled once per process for equal settings)."""
        fn = self._cached(f"step{stage}", lambda: train_loop.jit_step(
            functools.partial(self._train_step, stage=stage), self.state_shardings, self.batch_shardings, self.mesh,
            extra_args=1))  # the LPIPS weights
        return lambda state, batch: fn(state, batch, self.lpips_params)

    def put_batch(self, host_batch: Dict[str, np.ndarray]):
        return sharding.host_local_to_global(host_batch, self.mesh)


# Compiled init / reset / step functions, keyed by TokenizerTrainer._key.
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
# Training through the shared loop, then evaluation
# ------------------------------------------------------------------------------------------------

CHECKPOINT_KIND = "tokenizer_train_state"


def build_trainer(config, devices=None) -> "TokenizerTrainer":
    """TokenizerTrainer for a configs/tokenizer.py config on `devices` (default: all), laid out by
    config.mesh; reads the LPIPS files if LPIPS is on."""
    from iar_jax.tokenizer import config as cfg_lib

    loss_cfg = cfg_lib.loss_config_from(config)
    lpips_params = None
    if loss_cfg.perceptual_weight:
        from iar_jax.convert.lpips import load_lpips_params

        lpips_params = load_lpips_params(config.loss.lpips_vgg_path, config.loss.lpips_lin_path)
    else:
        logging.warning("LPIPS is off (loss.perceptual_weight=0): training without the perceptual loss")
    image_shape = (int(config.data.image_size),) * 2 + (int(config.model.in_channels),)
    return TokenizerTrainer(cfg_lib.model_config_from(config), loss_cfg, cfg_lib.optim_config_from(config),
                            cfg_lib.recipe_from(config), lpips_params, image_shape,
                            sharding.make_mesh(config.mesh, devices), sharding.rules(config.mesh))


def make_image_source(config, split: Optional[str] = None, limit: Optional[int] = None,
                      channels: Optional[int] = None):
    """float32 [N, S, S, C] evaluation images (see `iar_jax.tokenizer.data`)."""
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
    """Trains through `train_loop.run` (resuming from `workdir/checkpoints`, if a workdir is given) and
    evaluates. Returns (trainer, state, eval_metrics).

    `images` (float32 [N, S, S, C] in [-1, 1]) replaces config.data's training images. Without a
    workdir nothing is written (benchmarks, tests). `log_fn` / `step_fn` as in `train_loop.run`;
    `devices` defaults to all devices. `trainer.preempted` tells a run stopped by SIGTERM (after
    saving) from a finished one.
    """
    from iar_jax.tokenizer import data as data_lib

    d = config.data
    with train_loop.locked(config, workdir):
        trainer = build_trainer(config, devices)
        if images is None:
            images = data_lib.training_data(d.name, d.split, d.path or None, int(config.model.in_channels))
        elif tuple(images.shape[1:]) != trainer.image_shape:
            raise ValueError(f"training images are {tuple(images.shape[1:])}, the config wants {trainer.image_shape}; "
                             "set data.image_size / model.in_channels to match")
        source = data_lib.ImageSource(images, int(d.image_size), int(config.model.in_channels), bool(d.flip))
        result = train_loop.run(
            config, workdir, trainer.phases(), lambda: trainer.init_state(int(config.train.seed)),
            trainer.abstract_sharded_state(), train_loop.batch_iterator(config, source), trainer.put_batch,
            _meta(trainer), num_steps, log_fn, step_fn)
        trainer.preempted, state = result.preempted, result.state
        results = {}
        if not result.preempted and eval_images is not None and len(eval_images):
            results = _evaluate_run(config, workdir, trainer, state, eval_images, result.step)
            result.writer.write_scalars(result.step, {f"eval/{k}": v for k, v in results.items()})
            result.writer.flush()
    return trainer, state, results


def _evaluate_run(config, workdir, trainer, state, eval_images, step):
    mode = "dual" if trainer.model_cfg.dual else None
    params = state["params"]
    if jax.process_count() > 1:  # FSDP shards may live on other hosts
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    results, recon = evaluate(trainer.model, jax.device_get(params), eval_images, mode=mode)
    if workdir and jax.process_index() == 0:
        from iar_jax.evaluation import reconstruction

        n = int(config.train.num_grid_images)
        reconstruction.save_reconstruction_grid(os.path.join(workdir, "reconstructions.png"), eval_images[:n], recon[:n])
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump({"step": step, **results}, f)
    return results
