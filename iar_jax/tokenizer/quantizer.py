"""Vector quantizers of the tokenizer: LlamaGen's L2-normalised codebook and IAR2's dual codebook.

Single (LlamaGen, SPEC §1): z and the codebook are L2-normalised at every lookup; the code is the
argmin of the squared distance; z_q = C[k] with the straight-through estimator z + sg(z_q - z).

Dual (IAR2 "semantic-detail associated", SPEC §2): a 256-entry semantic codebook C_S, normalised at
every lookup, and a detail codebook C_D that is normalised once at init only (the reference stores
it as a raw parameter and never renormalises it). k = argmin ||z - C_S[k]||², r = z - C_S[k],
j = argmin ||r - C_D[j]||², z_q = C_S[k] + C_D[j]. In `semantic` mode (IAR2 stage 1 and the
semantic iterations of stage 2) only C_S is used.

Losses (reference): vq = mean((z_q - sg(z))²), commit = β·mean((sg(z_q) - z)²), entropy =
ratio · (sample entropy - batch entropy) of softmax(-d / 0.01). All computed in fp32.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Codes = Union[Array, Tuple[Array, Array]]

# Code assignment must not depend on the backend's default matmul precision (bf16 passes on TPU).
_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """F.normalize: x / max(||x||, eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def squared_distances(z: Array, codebook: Array) -> Array:
    """[M, D] x [N, D] -> [M, N], expanded as ||z||² + ||e||² - 2 z·e like the reference (same ties)."""
    return (
        jnp.sum(z**2, axis=1, keepdims=True)
        + jnp.sum(codebook**2, axis=1)[None, :]
        - 2.0 * jnp.einsum("md,nd->mn", z, codebook, precision=_HIGHEST)
    )


def entropy_loss(affinity: Array, temperature: float = 0.01) -> Array:
    """Reference `compute_entropy_loss(-d)`: mean per-sample entropy minus entropy of the mean."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    log_probs = jax.nn.log_softmax(logits + 1e-5, axis=-1)
    avg_probs = jnp.mean(probs, axis=0)
    avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
    sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
    return sample_entropy - avg_entropy


def codebook_usage(codes, codebook_size: int) -> float:
    """Fraction of the codebook's entries that occur in `codes` (any shape)."""
    codes = np.asarray(codes).reshape(-1)
    if codes.size == 0:
        return 0.0
    return float(np.unique(codes).size) / float(codebook_size)


@flax.struct.dataclass
class QuantizerOutput:
    z_q: Array  # straight-through quantised latents [B, h, w, D] (fp32)
    codes: Codes  # [B, h, w] int32, or (semantic, detail) for the dual quantizer in dual mode
    vq_loss: Array
    commit_loss: Array
    entropy_loss: Array
    z: Optional[Array] = None  # the (normalised) latents that were quantised, fp32

    @property
    def loss(self) -> Array:
        # The reference adds the three codebook terms unweighted to the generator loss.
        return self.vq_loss + self.commit_loss + self.entropy_loss


def _uniform_normalized(size: int, l2_norm: bool):
    """nn.Embedding init of the reference: U(-1/N, 1/N), then row-normalised if l2_norm."""

    def init(key, shape, dtype=jnp.float32):
        w = jax.random.uniform(key, shape, dtype, -1.0 / size, 1.0 / size)
        return l2_normalize(w) if l2_norm else w

    return init


def _losses(z: Array, z_q: Array, beta: float):
    vq = jnp.mean((z_q - jax.lax.stop_gradient(z)) ** 2)
    commit = beta * jnp.mean((jax.lax.stop_gradient(z_q) - z) ** 2)
    return vq, commit


def _nearest(z_flat: Array, codebook: Array) -> Tuple[Array, Array]:
    d = squared_distances(z_flat, codebook)
    return jnp.argmin(d, axis=1).astype(jnp.int32), d


class VectorQuantizer(nn.Module):
    """LlamaGen's single codebook (`quantize.embedding.weight`)."""

    codebook_size: int
    embed_dim: int
    beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    l2_norm: bool = True

    def setup(self):
        self.embedding = self.param(
            "embedding", _uniform_normalized(self.codebook_size, self.l2_norm), (self.codebook_size, self.embed_dim)
        )

    def codebook(self) -> Array:
        e = jnp.asarray(self.embedding, jnp.float32)
        return l2_normalize(e) if self.l2_norm else e

    def __call__(self, z: Array) -> QuantizerOutput:
        z = jnp.asarray(z, jnp.float32)
        if self.l2_norm:
            z = l2_normalize(z)
        emb = self.codebook()
        k, d = _nearest(z.reshape(-1, self.embed_dim), emb)
        z_q = emb[k].reshape(z.shape)
        vq, commit = _losses(z, z_q, self.beta)
        ent = self.entropy_loss_ratio * entropy_loss(-d) if self.entropy_loss_ratio else jnp.zeros((), jnp.float32)
        z_q = z + jax.lax.stop_gradient(z_q - z)
        return QuantizerOutput(z_q, k.reshape(z.shape[:-1]), vq, commit, ent, z)

    def lookup(self, codes: Array) -> Array:
        return self.codebook()[codes]


class DualQuantizer(nn.Module):
    """IAR2's semantic (`quantize.embedding.weight`) + detail (`quantize.embedding_second`) codebooks."""

    semantic_size: int
    detail_size: int
    embed_dim: int
    beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    l2_norm: bool = True

    def setup(self):
        self.embedding = self.param(
            "embedding", _uniform_normalized(self.semantic_size, self.l2_norm), (self.semantic_size, self.embed_dim)
        )
        # Normalised at init only: the reference never renormalises `embedding_second` afterwards.
        self.embedding_second = self.param(
            "embedding_second", _uniform_normalized(self.detail_size, self.l2_norm), (self.detail_size, self.embed_dim)
        )

    def semantic_codebook(self) -> Array:
        e = jnp.asarray(self.embedding, jnp.float32)
        return l2_normalize(e) if self.l2_norm else e

    def detail_codebook(self) -> Array:
        return jnp.asarray(self.embedding_second, jnp.float32)

    def __call__(self, z: Array, mode: str = "dual") -> QuantizerOutput:
        if mode not in ("dual", "semantic"):
            raise ValueError(f"quantizer mode {mode!r} is not supported; use 'dual' or 'semantic'")
        z = jnp.asarray(z, jnp.float32)
        if self.l2_norm:
            z = l2_normalize(z)
        z_flat = z.reshape(-1, self.embed_dim)
        c_s = self.semantic_codebook()
        k, d = _nearest(z_flat, c_s)
        zq_s = c_s[k]
        zero = jnp.zeros((), jnp.float32)
        if mode == "semantic":
            z_q = zq_s.reshape(z.shape)
            ent = self.entropy_loss_ratio * entropy_loss(-d) if self.entropy_loss_ratio else zero
            codes = k.reshape(z.shape[:-1])
        else:
            c_d = self.detail_codebook()
            j, d2 = _nearest(z_flat - zq_s, c_d)
            z_q = (zq_s + c_d[j]).reshape(z.shape)
            ent = (
                self.entropy_loss_ratio * (entropy_loss(-d) + entropy_loss(-d2)) if self.entropy_loss_ratio else zero
            )
            codes = (k.reshape(z.shape[:-1]), j.reshape(z.shape[:-1]))
        vq, commit = _losses(z, z_q, self.beta)
        z_q = z + jax.lax.stop_gradient(z_q - z)
        return QuantizerOutput(z_q, codes, vq, commit, ent, z)

    def lookup(self, codes: Codes) -> Array:
        if isinstance(codes, (tuple, list)):
            k, j = codes
            return self.semantic_codebook()[k] + self.detail_codebook()[j]
        return self.semantic_codebook()[codes]  # semantic-only decode (stage 1)
