"""The one trainer shared by IAR and IAR2 (the family is `config.model_family`).

State is a plain dict {step, params, opt_state, rng[, ema_params]} created already sharded by
`jax.jit(init, out_shardings=...)`; the update step is jitted with explicit shardings and donates
the old state. Gradient accumulation is a `lax.scan` over micro-batches. `train_and_evaluate` runs it
through the shared loop of `train_loop` (resume, checkpoints, logging, NaN guard, SIGTERM).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from iar_jax import checkpointing, sharding, train_loop
from iar_jax.models.families import Family, get_family


# ----------------------------------------------------------------------------------------------
# Optimizer


def lr_schedule(optim_cfg, num_steps: int) -> Callable:
    lr, warm = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
    if optim_cfg.schedule == "constant":
        if warm:
            return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
        return optax.constant_schedule(lr)
    if optim_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0 if warm else lr, lr, warm, max(num_steps, warm + 1),
                                                  float(optim_cfg.min_lr))
    raise ValueError(f"unknown optim.schedule {optim_cfg.schedule!r}; use constant or cosine")


# optim.decay: which params AdamW decays, named after the official optimizer groupings.
DECAY_RULES = {
    # >= 2-D params (LlamaGen; IAR train_c2i.py; IAR2 train_c2i_ddp.py): no biases, no norms.
    "ndim": "params that are >= 2-D in the reference model",
    # IAR2 train_c2i_fsdp.py groups by name (FSDP flattens params): biases decay too.
    "not_norm": "every param whose name lacks 'norm'",
}


def decay_mask(boxed_params, rule: str = "ndim"):
    """Weight-decay mask under `rule` (see DECAY_RULES). The layer axis added by nn.scan does not
    count as a dimension; our norm modules keep the reference names (attention_norm, ffn_norm, norm)."""
    if rule not in DECAY_RULES:
        choices = " or ".join(f"{k} ({v})" for k, v in DECAY_RULES.items())
        raise ValueError(f"unknown optim.decay {rule!r}; use {choices}")
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)

    def decayed(path, x):
        if rule == "not_norm":
            return "norm" not in "/".join(str(getattr(k, "key", k)) for k in path)
        if is_box(x):
            return len(x.names) - (1 if "layers" in x.names else 0) >= 2
        return x.ndim >= 2

    return jax.tree_util.tree_map_with_path(decayed, boxed_params, is_leaf=is_box)


def make_optimizer(optim_cfg, num_steps: int, mask):
    schedule = lr_schedule(optim_cfg, num_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(float(optim_cfg.grad_clip)) if optim_cfg.grad_clip else optax.identity(),
        optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
                    weight_decay=float(optim_cfg.weight_decay), mask=mask),
    )
    return tx, schedule


# ----------------------------------------------------------------------------------------------
# Trainer


def structural_model_meta(config) -> Dict[str, Any]:
    """Model settings that change parameter shapes, or (official_rope) what the weights mean
    (checked on resume / load)."""
    keep = ("vocab_size", "detail_vocab_size", "num_classes", "dim", "n_layer", "n_head", "grid_size",
            "head_layers", "cls_token_num", "official_rope")
    return {k: config.model[k] for k in keep if k in config.model}


@dataclasses.dataclass
class Trainer:
    config: Any
    devices: Optional[list] = None

    def __post_init__(self):
        c = self.config
        self.family: Family = get_family(c.model_family)
        self.module, self.model_cfg = self.family.build(c)
        self.mesh = sharding.make_mesh(c.mesh, self.devices)
        self.rules = sharding.rules(c.mesh)
        sharding.check_global_batch(int(c.train.global_batch), self.mesh, int(c.train.micro_batches))
        self.spec = self.family.batch_spec(c)
        self.loss_fn = self.family.make_loss(self.module, c)
        dummy = {k: jnp.zeros((1,) + tuple(s), d) for k, (s, d) in self.spec.items()}
        key = jax.random.PRNGKey(0)  # made outside the mesh context: the devices may be an AOT topology's
        with self._ctx():
            abstract_vars = jax.eval_shape(lambda r: self.family.init(self.module, r, dummy), key)
            self.param_shardings = sharding.logical_shardings(abstract_vars["params"], self.mesh, c.mesh)
        self.decay_mask = decay_mask(abstract_vars["params"], c.optim.get("decay", "ndim"))
        self.tx, self.schedule = make_optimizer(c.optim, int(c.train.num_steps), self.decay_mask)
        self._dummy = dummy
        self.ema_decay = float(c.train.ema_decay)

        def init(rng):
            p_rng, d_rng = jax.random.split(rng)
            params = nn.unbox(self.family.init(self.module, p_rng, dummy)["params"])
            state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params), "rng": d_rng}
            if self.ema_decay:
                state["ema_params"] = params
            return state

        self._init = init
        self.abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
        rep = sharding.replicated(self.mesh)
        self.state_shardings = {
            "step": rep,
            "rng": rep,
            "params": self.param_shardings,
            "opt_state": optax.tree_map_params(
                self.tx, lambda _, s: s, self.abstract_state["opt_state"], self.param_shardings,
                transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)),
        }
        if self.ema_decay:
            self.state_shardings["ema_params"] = self.param_shardings
        self.batch_shardings = {k: sharding.batch_sharding(self.mesh, len(s)) for k, (s, _) in self.spec.items()}
        self._jit_init = jax.jit(init, out_shardings=self.state_shardings)

        def from_params(params, rng):
            state = dict(init(rng), params=params, opt_state=self.tx.init(params))
            if self.ema_decay:
                state["ema_params"] = params
            return state

        self._jit_from_params = jax.jit(from_params, out_shardings=self.state_shardings)
        self._jit_step = train_loop.jit_step(self._train_step, self.state_shardings, self.batch_shardings, self.mesh)

    def _ctx(self):
        return sharding.mesh_rules(self.mesh, self.rules)

    # -- state --------------------------------------------------------------------------------
    def init_state(self, seed: int):
        key = jax.random.PRNGKey(seed)
        with self._ctx():
            return self._jit_init(key)

    def abstract_sharded_state(self):
        return checkpointing.abstract_with_shardings(self.abstract_state, self.state_shardings)

    def state_from_params(self, ckpt, step: int):
        """A fresh state around the params (and EMA params, when both the run and the step have
        them) of checkpoint `step`: restore=params_only."""
        abstract = self.abstract_sharded_state()
        keys = ["params"] + (["ema_params"] if "ema_params" in abstract and ckpt.item_tree(step, "ema_params") else [])
        saved = checkpointing.flat_signature({"params": ckpt.item_tree(step, "params")})
        wanted = checkpointing.flat_signature({"params": abstract["params"]})
        if saved != wanted:
            raise checkpointing.IncompatibleCheckpointError(
                f"checkpoint {ckpt.directory}/{step} holds other params ({checkpointing.describe_difference(saved, wanted)}); "
                "restore=params_only needs the same model: use its config or a fresh --workdir", step)
        got = ckpt.restore_items(step, {k: abstract[k] for k in keys})
        with self._ctx():
            fresh = self._jit_from_params(got["params"], jax.random.PRNGKey(int(self.config.train.seed)))
        fresh.update(got)
        fresh["step"] = jax.device_put(jnp.asarray(step, jnp.int32), self.state_shardings["step"])
        return fresh

    # -- step ---------------------------------------------------------------------------------
    def _train_step(self, state, batch):
        m = int(self.config.train.micro_batches)
        rng = jax.random.fold_in(state["rng"], state["step"])
        grad_fn = jax.value_and_grad(lambda p, b, r: self.loss_fn(p, b, r, True), has_aux=True)
        params = state["params"]
        if m == 1:
            (_, metrics), grads = grad_fn(params, batch, rng)
        else:
            # Micro-batch i takes rows i, i+m, i+2m, ...: every chunk stays spread over all devices.
            def split(x):
                x = x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)
                return nn.with_logical_constraint(x, (None, "act_batch") + (None,) * (x.ndim - 2))

            micro = jax.tree_util.tree_map(split, batch)

            def body(acc, xs):
                mb, i = xs
                (_, mets), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
                return jax.tree_util.tree_map(lambda a, b: a + b / m, acc, (g, mets)), None

            (_, mets0), g0 = jax.eval_shape(grad_fn, params, jax.tree_util.tree_map(lambda x: x[0], micro), rng)
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (g0, mets0))
            (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(m)))
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = dict(state, step=state["step"] + 1, params=new_params, opt_state=opt_state)
        if self.ema_decay:
            d = self.ema_decay
            new_state["ema_params"] = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state["ema_params"], new_params)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=self.schedule(state["step"]))
        return new_state, metrics

    def step(self, state, global_batch):
        with self._ctx():
            return self._jit_step(state, global_batch)

    def put_batch(self, host_batch: Dict[str, np.ndarray]):
        self.family.check_batch(host_batch, self.config)
        missing = set(self.spec) - set(host_batch)
        if missing:
            raise ValueError(f"batch lacks {sorted(missing)} needed by model family {self.family.name!r} "
                             f"(got {sorted(host_batch)}); check config.model_family against the codes")
        host_batch = {k: host_batch[k] for k in self.spec}
        for k, (shape, _) in self.spec.items():
            if tuple(host_batch[k].shape[1:]) != tuple(shape):
                raise ValueError(f"batch[{k!r}] has per-example shape {host_batch[k].shape[1:]}, the model expects "
                                 f"{tuple(shape)}; check config.model.grid_size against the codes")
        return sharding.host_local_to_global(host_batch, self.mesh)


# ----------------------------------------------------------------------------------------------
# Input


def make_source(config, spec):
    from iar_jax.data import codes as codes_lib

    d = config.data
    if d.source == "synthetic":
        return codes_lib.synthetic_source(spec, int(d.synthetic_size), int(config.train.seed) + 12345,
                                          int(config.model.vocab_size), int(config.model.num_classes),
                                          config.model.get("detail_vocab_size"))
    if d.source in ("npy", "npz", "codes"):
        if not d.path:
            raise ValueError("config.data.path is empty; point it at codes written by `iar-jax extract_codes`")
        return codes_lib.load_codes(d.path)
    if d.source == "records":
        from iar_jax.data import records

        fingerprint = None
        if d.get("tokenizer"):  # refuse codes extracted with another tokenizer
            from iar_jax.data.extract import tokenizer_fingerprint
            from iar_jax.tokenizer.checkpoint import load_tokenizer

            fingerprint = tokenizer_fingerprint(load_tokenizer(d.tokenizer)[1])
        return records.open_source(d.path, fingerprint=fingerprint, num_classes=int(config.model.num_classes),
                                   vocab=int(config.model.vocab_size), grid=int(config.model.grid_size))
    raise ValueError(f"unknown config.data.source {d.source!r}; use synthetic, npy or records")


# ----------------------------------------------------------------------------------------------
# Loop


def train_and_evaluate(config, workdir: str, source=None, devices=None, num_steps: Optional[int] = None,
                       log_fn: Optional[Callable[[int, Dict[str, float]], None]] = None,
                       step_fn: Optional[Callable[[int, Dict[str, Any]], None]] = None):
    """Trains (resuming from `workdir`) until config.train.num_steps through `train_loop.run`;
    returns (trainer, state); `trainer.preempted` tells a run stopped by SIGTERM (after saving) from
    a finished one. `log_fn` / `step_fn` as in `train_loop.run`."""
    with train_loop.locked(config, workdir):
        trainer = Trainer(config, devices)
        source = source if source is not None else make_source(config, trainer.spec)
        meta = {"kind": "train_state", "model_family": config.model_family, "model": structural_model_meta(config)}
        result = train_loop.run(
            config, workdir, [train_loop.Phase(0, trainer.step)], lambda: trainer.init_state(int(config.train.seed)),
            trainer.abstract_sharded_state(), train_loop.batch_iterator(config, source), trainer.put_batch, meta,
            num_steps, log_fn, step_fn, from_params=trainer.state_from_params)
    trainer.preempted = result.preempted
    return trainer, result.state
