"""Classifier-free guidance schedules (SPEC §6): small pure functions of (position n, T, attention a_n).

A schedule maps the image position n in [0, T) (and, for IAR2, the recorded attention a_n of the
conditional rows) to the guidance scale s_n; the sampler then mixes
    logits = u + s_n · (c − u)
computed as s·c + (1 − s)·u, which is exactly c at s = 1 (so scale 1 reproduces unguided sampling
bit for bit) and equal to the reference formula up to rounding otherwise.

Schedules are frozen dataclasses (hashable, so they can be static arguments of a jitted sampler):
  * `Constant(scale)`                     s_n = scale
  * `Interval(scale, num_tokens)`         s_n = scale for n < num_tokens, 1 afterwards
  * `Linear(start, end)`                  s_n = start + (end − start)·n/(T−1)
  * `AttentionGuided(start, end, w_attn)` IAR2 progressive: w_n = n/(T−1) + w_attn·a_n,
                                          s_n = start·(1 − w_n) + end·w_n (w_n not clipped)
For T = 1 the step weight n/(T−1) is 0.5, as in the IAR2 reference.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import jax.numpy as jnp

Scalar = Union[float, Any]


def step_weight(n, T: int):
    """n / (T − 1), the linear ramp shared by `Linear` and `AttentionGuided` (0.5 when T = 1)."""
    if T <= 1:
        return jnp.float32(0.5)
    return jnp.asarray(n, jnp.float32) / jnp.float32(T - 1)


@dataclasses.dataclass(frozen=True)
class Constant:
    scale: float = 1.0
    needs_attention = False

    @property
    def unguided(self) -> bool:
        return float(self.scale) == 1.0

    def __call__(self, n, T: int, attn=None):
        return jnp.float32(self.scale)


@dataclasses.dataclass(frozen=True)
class Interval:
    """Guide only the first `num_tokens` positions (LlamaGen's `--cfg-interval K` guides the prefill
    token plus decode steps i ≤ K, i.e. positions n ≤ K + 1: use num_tokens = K + 2 to match it)."""

    scale: float
    num_tokens: int
    needs_attention = False

    @property
    def unguided(self) -> bool:
        return float(self.scale) == 1.0 or self.num_tokens <= 0

    def __call__(self, n, T: int, attn=None):
        return jnp.where(jnp.asarray(n) < self.num_tokens, jnp.float32(self.scale), jnp.float32(1.0))


@dataclasses.dataclass(frozen=True)
class Linear:
    start: float
    end: float
    needs_attention = False

    @property
    def unguided(self) -> bool:
        return float(self.start) == 1.0 and float(self.end) == 1.0

    def __call__(self, n, T: int, attn=None):
        return jnp.float32(self.start) + (jnp.float32(self.end) - jnp.float32(self.start)) * step_weight(n, T)


@dataclasses.dataclass(frozen=True)
class AttentionGuided:
    """IAR2 progressive attention-guided CFG; `attn` is a_n per conditional row, shape [B]."""

    start: float
    end: float
    w_attn: float
    needs_attention = True

    @property
    def unguided(self) -> bool:
        return float(self.start) == 1.0 and float(self.end) == 1.0

    def __call__(self, n, T: int, attn=None):
        if attn is None:
            raise ValueError("AttentionGuided needs the recorded attention a_n; the model step must pass it")
        w = step_weight(n, T) + jnp.float32(self.w_attn) * jnp.asarray(attn, jnp.float32)
        return jnp.float32(self.start) * (1.0 - w) + jnp.float32(self.end) * w


Schedule = Union[Constant, Interval, Linear, AttentionGuided]

_KINDS = {
    "constant": (Constant, ("scale",)),
    "interval": (Interval, ("scale", "num_tokens")),
    "linear": (Linear, ("start", "end")),
    "attention": (AttentionGuided, ("start", "end", "w_attn")),
}


def from_dict(d: Optional[Mapping[str, Any]], what: str = "guidance") -> Schedule:
    """{'kind': 'constant'|'interval'|'linear'|'attention', ...scales} -> a schedule (one-line errors)."""
    if d is None:
        return Constant(1.0)
    d = dict(d)
    kind = d.pop("kind", "constant")
    if kind not in _KINDS:
        raise ValueError(f"{what}.kind={kind!r} is unknown; use one of {', '.join(_KINDS)}")
    cls, needed = _KINDS[kind]
    missing = [k for k in needed if d.get(k) is None]
    if missing:
        raise ValueError(f"{what} kind {kind!r} is missing {', '.join(missing)}; set "
                         + " ".join(f"{what}.{k}=..." for k in missing))
    extra = sorted(k for k in d if k not in needed and d[k] is not None)
    if extra:
        raise ValueError(f"{what} kind {kind!r} does not take {', '.join(extra)}; it takes {', '.join(needed)}")
    kw = {k: (int(d[k]) if k == "num_tokens" else float(d[k])) for k in needed}
    return cls(**kw)


def scale_sequence(schedule: Schedule, T: int, attn=None):
    """Scales for all T positions: [T], or [T, B] given attn [T, B]. For inspection and tests."""
    n = jnp.arange(T)
    if attn is None:
        return jnp.broadcast_to(schedule(n, T, None), (T,))
    attn = jnp.asarray(attn, jnp.float32)
    return jnp.broadcast_to(schedule(n[:, None], T, attn), attn.shape)
