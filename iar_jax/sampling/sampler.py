"""One jitted AR sampler: prefill, then a `lax.scan` over image positions with a fixed-size KV cache.

The loop is model-agnostic. A model family plugs in its per-position step through `StepFns`;
this module owns everything around it: cond/uncond row batching for classifier-free guidance,
guidance schedules, temperature / top-k / top-p, and the per-sample PRNG keys.

Plug-in protocol (IAR: `iar_jax.sampling.gpt_step`; IAR2: its own model module)
------------------------------------------------------------------------------
    StepFns(
        num_positions=T,                  # image positions the scan runs over
        null_class=num_classes,           # class id of the unconditional rows
        sub_tokens=("token",),            # names of the ids drawn per position, e.g. ("semantic", "detail")
        init_state=init_state,            # (params, row_labels [R]) -> state pytree
        step=step,                        # (params, state, ctx: SampleContext) -> (state, tokens [B, K] int32)
        vocab_sizes=(V,),                 # optional, per sub-token (checks top-k)
        prepare=None,                     # optional params -> params, once per call before the scan
    )

`init_state` runs once before the scan (typically: fresh cache + prefill of the class token) and
returns any pytree of fixed shapes: it is the scan carry. `step` is called once per position n
(`ctx.n`, traced int32) and must return the new state and the K sub-token ids it drew for the B
samples. Rows: with CFG, R = 2B rows hold (cond, uncond) pairs, **interleaved**
[c_0, u_0, c_1, u_1, ...] so that a batch-sharded row axis keeps both rows of a sample on one
device; without CFG, R = B. A step never indexes rows itself; it uses the context:

    ctx.sample(j, logits_rows [R, V], attn=None) -> ids [B]   # CFG mix at position n with sub-token
        # j's schedule, then temperature / top-k / top-p, then a seeded draw per sample. `attn` is
        # a_n for the conditional rows, [B] (only needed by `AttentionGuided`; pass ctx.cond(a)).
    ctx.rows(x [B, ...]) -> [R, ...]   # feed drawn ids back to every row of their sample
    ctx.cond(x [R, ...]) -> [B, ...]   # the conditional rows
    ctx.n, ctx.num_positions, ctx.batch, ctx.cfg

Randomness: sample i draws with fold_in(fold_in(fold_in(seed_key, i), n), j), where i is its
GLOBAL sample index, so results do not depend on batch size, chunking or device count.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from iar_jax.sampling import filtering, guidance
from iar_jax.sampling.filtering import SamplingConfig
from iar_jax.sampling.guidance import Schedule


@dataclasses.dataclass(frozen=True)
class SubToken:
    """How one sub-token of a position is drawn: its guidance schedule and sampling controls."""

    guidance: Schedule = guidance.Constant(1.0)
    sampling: SamplingConfig = SamplingConfig()


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Static sampling settings, one `SubToken` per sub-token (IAR: 1; IAR2: semantic, detail)."""

    sub_tokens: Tuple[SubToken, ...] = (SubToken(),)
    # Batch unconditional rows even when every schedule is the identity (tests, debugging).
    force_cfg: bool = False

    @property
    def cfg(self) -> bool:
        return self.force_cfg or any(not s.guidance.unguided for s in self.sub_tokens)

    def validate(self, vocab_sizes: Optional[Sequence[int]] = None, names: Sequence[str] = ()) -> "SamplerSpec":
        for j, s in enumerate(self.sub_tokens):
            what = f"sampling[{names[j] if j < len(names) else j}]"
            s.sampling.validate(None if vocab_sizes is None else vocab_sizes[j], what)
        return self


@dataclasses.dataclass(frozen=True)
class StepFns:
    """A model's per-position sampling step (see the module docstring for the protocol)."""

    num_positions: int
    null_class: int
    sub_tokens: Tuple[str, ...]
    init_state: Callable[[Any, jax.Array], Any]
    step: Callable[[Any, Any, "SampleContext"], Tuple[Any, jax.Array]]
    vocab_sizes: Tuple[int, ...] = ()  # per sub-token; used to validate top-k (optional)
    # params -> params used by init_state/step; runs once per sampler call, before the scan
    # (e.g. cast weights to the compute dtype, re-layout stacked layers). Optional.
    prepare: Optional[Callable[[Any], Any]] = None


class SampleContext:
    """What a step needs at position n: row layout helpers and the guided, seeded draw."""

    def __init__(self, spec: SamplerSpec, n, num_positions: int, batch: int, keys):
        self.spec, self.n, self.num_positions, self.batch, self.keys = spec, n, num_positions, batch, keys
        self.cfg = spec.cfg
        self.records = {}  # sub-token j -> (scale [B], attn [B] or None), for `record=True`

    def rows(self, x):
        if not self.cfg:
            return x
        return jnp.repeat(x, 2, axis=0)

    def cond(self, x):
        return x[0::2] if self.cfg else x

    def uncond(self, x):
        if not self.cfg:
            raise ValueError("no unconditional rows: CFG is off for this sampler spec")
        return x[1::2]

    def guide(self, j: int, logits, attn=None):
        """CFG-mixed fp32 logits [B, V] of sub-token j at this position (and the scale [B] used)."""
        sched = self.spec.sub_tokens[j].guidance
        logits = logits.astype(jnp.float32)
        if not self.cfg:
            scale = jnp.ones((self.batch,), jnp.float32)
            self.records[j] = (scale, attn)
            return logits, scale
        c, u = logits[0::2], logits[1::2]
        scale = jnp.broadcast_to(sched(self.n, self.num_positions, attn), (self.batch,)).astype(jnp.float32)
        self.records[j] = (scale, attn)
        s = scale[:, None]
        # s·c + (1 − s)·u == u + s·(c − u); this form is exactly c at s = 1.
        return s * c + (1.0 - s) * u, scale

    def sample(self, j: int, logits, attn=None):
        mixed, _ = self.guide(j, logits, attn)
        keys = jax.vmap(jax.random.fold_in, (0, None))(self.keys, j)
        return filtering.sample(mixed, self.spec.sub_tokens[j].sampling, keys)


def row_labels(labels, null_class: int, cfg: bool):
    """[B] class labels -> [R] row labels (interleaved cond/uncond pairs under CFG)."""
    labels = jnp.asarray(labels, jnp.int32)
    if not cfg:
        return labels
    return jnp.stack([labels, jnp.full_like(labels, null_class)], axis=1).reshape(-1)


def sample_keys(seed_key, sample_ids):
    """One PRNG key per sample from its global index."""
    if not jnp.issubdtype(seed_key.dtype, jax.dtypes.prng_key):
        seed_key = jax.random.wrap_key_data(seed_key)
    return jax.vmap(jax.random.fold_in, (None, 0))(seed_key, jnp.asarray(sample_ids, jnp.uint32))


def sample_tokens(step_fns: StepFns, spec: SamplerSpec, params, labels, sample_ids, seed_key, record: bool = False):
    """labels [B], sample_ids [B] (global indices), seed_key -> ids [B, T, K] int32.

    With `record=True` also returns {'scale': [B, T, K], 'attn': [B, T, K]} (attention is 0 where a
    step passed none): the guidance actually applied, for inspection and tests.
    """
    T, K = step_fns.num_positions, len(step_fns.sub_tokens)
    if len(spec.sub_tokens) != K:
        raise ValueError(f"sampler spec has {len(spec.sub_tokens)} sub-token settings but the model draws {K} "
                         f"({', '.join(step_fns.sub_tokens)}); give one guidance/sampling entry per sub-token")
    B = labels.shape[0]
    keys = sample_keys(seed_key, sample_ids)
    if step_fns.prepare is not None:
        params = step_fns.prepare(params)
    state = step_fns.init_state(params, row_labels(labels, step_fns.null_class, spec.cfg))

    def body(state, n):
        ctx = SampleContext(spec, n, T, B, jax.vmap(jax.random.fold_in, (0, None))(keys, n))
        state, toks = step_fns.step(params, state, ctx)
        toks = jnp.asarray(toks, jnp.int32).reshape(B, K)
        if not record:
            return state, toks
        scale = jnp.stack([ctx.records.get(j, (jnp.ones((B,)), None))[0] for j in range(K)], axis=-1)
        attn = jnp.stack([jnp.zeros((B,)) if ctx.records.get(j, (0, None))[1] is None
                          else ctx.records[j][1].astype(jnp.float32) for j in range(K)], axis=-1)
        return state, (toks, scale, attn)

    _, ys = jax.lax.scan(body, state, jnp.arange(T, dtype=jnp.int32))
    if not record:
        return jnp.swapaxes(ys, 0, 1)
    toks, scale, attn = (jnp.swapaxes(y, 0, 1) for y in ys)
    return toks, {"scale": scale, "attn": attn}


def make_sampler(step_fns: StepFns, spec: SamplerSpec, record: bool = False, **jit_kwargs):
    """jit(params, labels [B], sample_ids [B], seed_key) -> ids [B, T, K] (and records if asked)."""

    def fn(params, labels, sample_ids, seed_key):
        return sample_tokens(step_fns, spec, params, labels, sample_ids, seed_key, record=record)

    return jax.jit(fn, **jit_kwargs)


def check_labels(labels, num_classes: int) -> None:
    """One-line error for labels outside [0, num_classes) (the null class is reserved for CFG)."""
    import numpy as np

    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.max()) if labels.max() >= num_classes else int(labels.min())
        raise ValueError(f"class label {bad} is outside [0, {num_classes}); labels must be < num_classes "
                         f"(id {num_classes} is the null class used for CFG)")
