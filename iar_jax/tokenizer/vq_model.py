"""LlamaGen's VQ tokenizer (VQ-16 / VQ-8 and small presets) in Flax Linen, channels-last.

Layout follows `tokenizer/tokenizer_image/vq_model.py` of LlamaGen (and IAR2, which reuses it) to
the letter, so checkpoints convert with transposes only (`iar_jax.convert.vq`):
  * GroupNorm(32 groups, eps 1e-6, affine), swish, 3×3 convs with padding 1;
  * ResnetBlock: norm1-swish-conv1-norm2-swish-dropout-conv2, 1×1 `nin_shortcut` when channels change;
  * AttnBlock: single-head self-attention over h·w positions with 1×1 q/k/v/proj_out, scale c^-½;
  * Downsample: zero-pad right/bottom by 1, then 3×3 stride-2 VALID conv;
  * Upsample: nearest ×2, then 3×3 conv;
  * encoder: num_res_blocks per level (+ attention after each at the last level), mid res-attn-res,
    norm, swish, conv_out to z_channels; decoder mirrors it with num_res_blocks + 1 per level;
  * quant_conv / post_quant_conv: 1×1 convs z_channels <-> codebook_embed_dim.
Flax module names mirror the PyTorch attribute names (`conv_blocks_3/res_1/norm2`), with `.i`
list indices written `_i`.

Public API: `VQModel.encode(images) -> codes`, `VQModel.decode(codes) -> images` (both through
`model.apply(variables, x, method=...)`), `VQModel.__call__(images) -> (reconstruction, QuantizerOutput)`
for training. `VQTokenizer` wraps a model and its params with eager input checks and jitted calls.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iar_jax.tokenizer.quantizer import Codes, DualQuantizer, QuantizerOutput, VectorQuantizer

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """Hyper-parameters of one tokenizer (names follow LlamaGen's `ModelArgs`)."""

    codebook_size: int = 16384  # single codebook; for the dual quantizer: the detail codebook C_D
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    ch: int = 128
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dropout_p: float = 0.0
    dual: bool = False  # IAR2 semantic + detail codebooks
    semantic_codebook_size: int = 256  # IAR2's C_S (hard-coded 256 in the reference)
    dtype: str = "float32"  # compute dtype of convs/attention; params, norms, softmax, quantizer fp32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def vocab_sizes(self) -> Tuple[int, ...]:
        """(codebook_size,) for a single tokenizer, (semantic, detail) sizes for a dual one."""
        return (self.semantic_codebook_size, self.codebook_size) if self.dual else (self.codebook_size,)

    def validate(self) -> "VQConfig":
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(
                f"encoder_ch_mult {self.encoder_ch_mult} and decoder_ch_mult {self.decoder_ch_mult} have different "
                "lengths; give both the same number of levels"
            )
        widths = {self.ch * m for m in tuple(self.encoder_ch_mult) + tuple(self.decoder_ch_mult)} | {self.ch}
        bad = sorted(w for w in widths if w % self.norm_groups)
        if bad:
            raise ValueError(
                f"channel widths {bad} are not divisible by norm_groups={self.norm_groups}; change ch/ch_mult or norm_groups"
            )
        for name in ("codebook_size", "semantic_codebook_size", "codebook_embed_dim", "z_channels", "in_channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {self.dtype!r} is not supported; use float32, bfloat16 or float16")
        return self


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


def _torch_conv_init(fan_in: int):
    """PyTorch's default Conv2d init: kaiming_uniform(a=√5) weights and U(±1/√fan_in) bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), bias_init


def _precision(dtype):
    # fp32 means fp32 (reference parity) also on GPU/TPU, whose default would use TF32/bf16 passes.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class Conv(nn.Module):
    """Conv2d with PyTorch's default init; `kernel` is HWIO (the torch OIHW weight transposed)."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Any = 1  # int (symmetric) or ((top, bottom), (left, right))
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Any = None
    bias_init: Any = None

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1] * self.kernel_size * self.kernel_size
        w_init, b_init = _torch_conv_init(fan_in)
        shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init or w_init, shape)
        pad = self.padding
        if isinstance(pad, int):
            pad = ((pad, pad), (pad, pad))
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=pad,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=_precision(self.dtype),
        )
        if self.use_bias:
            y = y + self.param("bias", self.bias_init or b_init, (self.features,)).astype(self.dtype)
        return y


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm (two-pass variance), computed in fp32, output in the compute dtype."""

    num_groups: int = 32
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        xf = x.astype(jnp.float32)
        g = xf.reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
        mean = jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(xf.shape)
        return (y * scale + bias).astype(self.dtype)


def swish(x):
    return x * jax.nn.sigmoid(x)


class ResnetBlock(nn.Module):
    out_channels: int
    cfg: VQConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        h = swish(GroupNorm(cfg.norm_groups, cfg.norm_eps, dt, name="norm1")(x))
        h = Conv(self.out_channels, dtype=dt, name="conv1")(h)
        h = swish(GroupNorm(cfg.norm_groups, cfg.norm_eps, dt, name="norm2")(h))
        h = nn.Dropout(cfg.dropout_p, deterministic=not train or cfg.dropout_p == 0)(h)
        h = Conv(self.out_channels, dtype=dt, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, kernel_size=1, padding=0, dtype=dt, name="nin_shortcut")(x)
        return x.astype(dt) + h


class AttnBlock(nn.Module):
    cfg: VQConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        c = x.shape[-1]
        h = GroupNorm(cfg.norm_groups, cfg.norm_eps, dt, name="norm")(x)
        q = Conv(c, kernel_size=1, padding=0, dtype=dt, name="q")(h)
        k = Conv(c, kernel_size=1, padding=0, dtype=dt, name="k")(h)
        v = Conv(c, kernel_size=1, padding=0, dtype=dt, name="v")(h)
        b, hh, ww, _ = q.shape
        q, k, v = (t.reshape(b, hh * ww, c) for t in (q, k, v))
        prec = _precision(dt)
        logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32, precision=prec) * (c**-0.5)
        w = jax.nn.softmax(logits, axis=-1)  # fp32 softmax
        o = jnp.einsum("bij,bjc->bic", w.astype(dt), v, precision=prec).reshape(b, hh, ww, c)
        return x.astype(dt) + Conv(c, kernel_size=1, padding=0, dtype=dt, name="proj_out")(o)


class Downsample(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        # torch: F.pad(x, (0, 1, 0, 1)) then a 3×3 stride-2 conv without padding.
        return Conv(x.shape[-1], stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # F.interpolate(scale 2, mode="nearest")
        return Conv(x.shape[-1], dtype=self.dtype, name="conv")(x)


class EncoderLevel(nn.Module):
    """`encoder.conv_blocks.{l}`: res blocks (+ attention at the last level), then `downsample`."""

    out_channels: int
    with_attn: bool
    with_downsample: bool
    cfg: VQConfig

    @nn.compact
    def __call__(self, h, train: bool = False):
        for i in range(self.cfg.num_res_blocks):
            h = ResnetBlock(self.out_channels, self.cfg, name=f"res_{i}")(h, train)
            if self.with_attn:
                h = AttnBlock(self.cfg, name=f"attn_{i}")(h)
        if self.with_downsample:
            h = Downsample(self.cfg.compute_dtype, name="downsample")(h)
        return h


class DecoderLevel(nn.Module):
    """`decoder.conv_blocks.{i}`: num_res_blocks + 1 res blocks (+ attention), then `upsample`."""

    out_channels: int
    with_attn: bool
    with_upsample: bool
    cfg: VQConfig

    @nn.compact
    def __call__(self, h, train: bool = False):
        for i in range(self.cfg.num_res_blocks + 1):
            h = ResnetBlock(self.out_channels, self.cfg, name=f"res_{i}")(h, train)
            if self.with_attn:
                h = AttnBlock(self.cfg, name=f"attn_{i}")(h)
        if self.with_upsample:
            h = Upsample(self.cfg.compute_dtype, name="upsample")(h)
        return h


def _mid(cfg: VQConfig, h, train: bool):
    # `mid.0`, `mid.1`, `mid.2`: res, attn, res at the lowest resolution.
    h = ResnetBlock(h.shape[-1], cfg, name="mid_0")(h, train)
    h = AttnBlock(cfg, name="mid_1")(h)
    return ResnetBlock(h.shape[-1], cfg, name="mid_2")(h, train)


class Encoder(nn.Module):
    cfg: VQConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        mult = tuple(cfg.encoder_ch_mult)
        last = len(mult) - 1
        h = Conv(cfg.ch, dtype=dt, name="conv_in")(x)
        for level, m in enumerate(mult):
            h = EncoderLevel(cfg.ch * m, level == last, level != last, cfg, name=f"conv_blocks_{level}")(h, train)
        h = _mid(cfg, h, train)
        h = swish(GroupNorm(cfg.norm_groups, cfg.norm_eps, dt, name="norm_out")(h))
        return Conv(cfg.z_channels, dtype=dt, name="conv_out")(h)


class Decoder(nn.Module):
    cfg: VQConfig

    @nn.compact
    def __call__(self, z, train: bool = False):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        mult = tuple(cfg.decoder_ch_mult)
        last = len(mult) - 1
        h = Conv(cfg.ch * mult[last], dtype=dt, name="conv_in")(z)
        h = _mid(cfg, h, train)
        # conv_blocks.{i} holds level (last - i): the reference builds them in reversed level order.
        for i, level in enumerate(reversed(range(len(mult)))):
            h = DecoderLevel(cfg.ch * mult[level], level == last, level != 0, cfg, name=f"conv_blocks_{i}")(h, train)
        h = swish(GroupNorm(cfg.norm_groups, cfg.norm_eps, dt, name="norm_out")(h))
        return Conv(cfg.out_channels, dtype=dt, name="conv_out")(h)


# ------------------------------------------------------------------------------------------------
# The tokenizer
# ------------------------------------------------------------------------------------------------


def check_images(cfg: VQConfig, shape: Sequence[int]) -> None:
    """One-line errors for images the tokenizer cannot take (called at trace time and eagerly)."""
    if len(shape) != 4:
        raise ValueError(f"images must be a 4-D NHWC batch [B, H, W, {cfg.in_channels}]; got shape {tuple(shape)}")
    _, h, w, c = shape
    if c != cfg.in_channels:
        hint = " (looks like NCHW: transpose to channels-last)" if shape[1] == cfg.in_channels else ""
        raise ValueError(
            f"images have {c} channels but the tokenizer expects {cfg.in_channels}{hint}; "
            f"convert the images or set in_channels"
        )
    f = cfg.downsample_factor
    if h % f or w % f:
        raise ValueError(
            f"image size {h}x{w} is not divisible by the tokenizer's downsample factor {f}; "
            f"resize or crop to a multiple of {f}"
        )


class VQModel(nn.Module):
    """Encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder (LlamaGen `VQModel`)."""

    config: VQConfig

    def setup(self):
        cfg = self.config.validate()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv(cfg.codebook_embed_dim, kernel_size=1, padding=0, dtype=jnp.float32)
        self.post_quant_conv = Conv(cfg.z_channels, kernel_size=1, padding=0, dtype=cfg.compute_dtype)
        if cfg.dual:
            self.quantize = DualQuantizer(
                cfg.semantic_codebook_size, cfg.codebook_size, cfg.codebook_embed_dim,
                cfg.commit_loss_beta, cfg.entropy_loss_ratio, cfg.codebook_l2_norm,
            )
        else:
            self.quantize = VectorQuantizer(
                cfg.codebook_size, cfg.codebook_embed_dim, cfg.commit_loss_beta, cfg.entropy_loss_ratio,
                cfg.codebook_l2_norm,
            )

    def _mode(self, mode: Optional[str]) -> Optional[str]:
        if not self.config.dual:
            if mode not in (None, "single"):
                raise ValueError(f"mode {mode!r} needs a dual (IAR2) tokenizer; this config has dual=False")
            return None
        return mode or "dual"

    def quantize_images(self, images: Array, train: bool = False, mode: Optional[str] = None) -> QuantizerOutput:
        check_images(self.config, images.shape)
        h = self.encoder(images, train)
        h = self.quant_conv(h.astype(jnp.float32))
        mode = self._mode(mode)
        return self.quantize(h) if mode is None else self.quantize(h, mode=mode)

    def decode_latents(self, z_q: Array, train: bool = False) -> Array:
        h = self.post_quant_conv(z_q)
        return self.decoder(h, train).astype(jnp.float32)

    def __call__(self, images: Array, train: bool = False, mode: Optional[str] = None):
        """Training forward: (reconstruction in ~[-1, 1], QuantizerOutput with losses and codes)."""
        q = self.quantize_images(images, train, mode)
        return self.decode_latents(q.z_q, train), q

    def encode(self, images: Array, mode: Optional[str] = None) -> Codes:
        """[B, H, W, C] images in [-1, 1] -> codes [B, h, w] (dual: (semantic, detail) pair)."""
        return self.quantize_images(images, False, mode).codes

    def decode(self, codes: Codes) -> Array:
        """Codes (as returned by `encode`) -> images [B, H, W, C] (unclipped, ~[-1, 1])."""
        if self.config.dual and not isinstance(codes, (tuple, list)):
            codes = jnp.asarray(codes)  # semantic-only decode (IAR2 stage 1)
        z_q = self.quantize.lookup(codes)
        return self.decode_latents(z_q)


def build_model(cfg: VQConfig) -> VQModel:
    return VQModel(cfg.validate())


def init_params(cfg: VQConfig, rng: Array, image_size: Optional[int] = None):
    """Fresh fp32 params (the Flax 'params' collection), initialised in one compiled call."""
    size = image_size or cfg.downsample_factor
    x = jnp.zeros((1, size, size, cfg.in_channels), jnp.float32)
    return jax.jit(lambda r, x: build_model(cfg).init({"params": r}, x)["params"])(rng, x)


@functools.lru_cache(maxsize=32)
def abstract_params(cfg: VQConfig):
    """Shapes of the params tree, without allocating them (cached per config)."""
    size = cfg.downsample_factor
    x = jax.ShapeDtypeStruct((1, size, size, cfg.in_channels), jnp.float32)
    return jax.eval_shape(lambda r, x: build_model(cfg).init({"params": r}, x), jax.random.key(0), x)["params"]


def check_params(cfg: VQConfig, params) -> None:
    """One-line errors for a dual checkpoint loaded as single and vice versa."""
    q = params.get("quantize", {}) if hasattr(params, "get") else {}
    has_detail = "embedding_second" in q
    if has_detail and not cfg.dual:
        raise ValueError(
            "these tokenizer params hold a dual (IAR2) quantizer (quantize/embedding_second) but the config is single; "
            "use a dual config (configs/tokenizer.py:iar2) or kind 'iar2_vq'"
        )
    if cfg.dual and not has_detail:
        raise ValueError(
            "the config is a dual (IAR2) tokenizer but these params have a single codebook (no quantize/embedding_second); "
            "use a single config (e.g. configs/tokenizer.py:vq16) or kind 'llamagen_vq'"
        )


class VQTokenizer:
    """A model plus its params with eager input checks and cached jitted encode/decode.

    >>> tok = VQTokenizer(cfg, params)
    >>> codes = tok.encode(images)        # [B, h, w] (dual: (semantic, detail))
    >>> images = tok.decode(codes)        # [B, H, W, C], clipped to [-1, 1]
    """

    def __init__(self, cfg: VQConfig, params):
        check_params(cfg, params)
        self.config = cfg.validate()
        self.model = build_model(cfg)
        self.params = params
        self._encode = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method=VQModel.encode))
        self._decode = jax.jit(lambda p, c: self.model.apply({"params": p}, c, method=VQModel.decode))

    def encode(self, images) -> Codes:
        check_images(self.config, np.shape(images))
        return self._encode(self.params, jnp.asarray(images, jnp.float32))

    def check_codes(self, codes) -> None:
        cfg = self.config
        if cfg.dual:
            if not isinstance(codes, (tuple, list)) or len(codes) != 2:
                raise ValueError("a dual (IAR2) tokenizer decodes a (semantic, detail) pair of code arrays; pass both")
            pairs = zip(codes, (cfg.semantic_codebook_size, cfg.codebook_size), ("semantic", "detail"))
        else:
            if isinstance(codes, (tuple, list)):
                raise ValueError("a single-codebook tokenizer decodes one code array, not a pair; use a dual config for IAR2 codes")
            pairs = [(codes, cfg.codebook_size, "")]
        for c, n, what in pairs:
            c = np.asarray(c)
            if c.ndim != 3:
                raise ValueError(f"{what} codes must have shape [B, h, w]; got {c.shape}".replace("  ", " ").lstrip())
            if not np.issubdtype(c.dtype, np.integer):
                raise ValueError(f"{what} codes must be integers; got dtype {c.dtype}".lstrip())
            if c.size and (c.min() < 0 or c.max() >= n):
                raise ValueError(
                    f"{what} codes out of range [0, {n}): min {c.min()}, max {c.max()}; "
                    "were they made by a different tokenizer or rearranged without the matching codebook?".lstrip()
                )

    def decode(self, codes, clip: bool = True) -> Array:
        self.check_codes(codes)
        codes = tuple(jnp.asarray(c, jnp.int32) for c in codes) if self.config.dual else jnp.asarray(codes, jnp.int32)
        out = self._decode(self.params, codes)
        return jnp.clip(out, -1.0, 1.0) if clip else out

    def reconstruct(self, images, clip: bool = True) -> Array:
        return self.decode(self.encode(images), clip=clip)
