"""Sampling controls (SPEC §6): temperature, top-k, top-p, and seeded per-row sampling.

Order follows the reference samplers: divide by the temperature, then top-k, then top-p on the
softmax of what top-k left, then sample from the softmax. Every row draws with its own key, so a
sample depends only on its own key (the sampler folds in the global sample index), never on the
batch it was generated in or on the device count.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def validate(self, vocab_size: int = None, what: str = "sampling") -> "SamplingConfig":
        if not self.temperature >= 0:
            raise ValueError(f"{what}.temperature={self.temperature} is negative; use 0 (greedy) or a positive value")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"{what}.top_p={self.top_p} is outside (0, 1]; use 1.0 to turn nucleus filtering off")
        if self.top_k < 0:
            raise ValueError(f"{what}.top_k={self.top_k} is negative; use 0 to turn top-k off")
        if vocab_size is not None and self.top_k > vocab_size:
            raise ValueError(f"{what}.top_k={self.top_k} exceeds the vocabulary ({vocab_size}); use at most {vocab_size}")
        return self


def top_k_filter(logits, k: int):
    """Keep the logits ≥ the k-th largest of each row (ties at the k-th value are kept, as in the reference)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits, p: float):
    """Nucleus filtering: keep the smallest prefix (by descending probability) whose mass is ≥ p."""
    if p >= 1.0:
        return logits
    srt = -jnp.sort(-logits, axis=-1)  # descending
    probs = jax.nn.softmax(srt.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
    # Token i is needed while the better ones hold < p; the top token always stays (mass_before = 0 < p).
    num_keep = jnp.sum(mass_before < p, axis=-1, keepdims=True)
    thresh = jnp.take_along_axis(srt, num_keep - 1, axis=-1)
    return jnp.where(logits < thresh, NEG_INF, logits)


def filter_logits(logits, cfg: SamplingConfig):
    """Temperature, top-k and top-p applied to fp32 logits [..., V]."""
    logits = logits.astype(jnp.float32)
    if cfg.temperature > 0 and cfg.temperature != 1.0:
        logits = logits / jnp.float32(cfg.temperature)
    logits = top_k_filter(logits, cfg.top_k)
    return top_p_filter(logits, cfg.top_p)


def sample(logits, cfg: SamplingConfig, keys):
    """logits [B, V], keys [B] (one PRNG key per row) -> token ids [B] int32."""
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits, cfg)
    return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, logits).astype(jnp.int32)
