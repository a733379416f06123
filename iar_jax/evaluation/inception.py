"""Inception-v3 FID network: the TF `inception-2015-12-05` graph (`classify_image_graph_def.pb`) in Flax.

This is the network behind every published FID / sFID / IS / precision-recall number (ADM evaluator,
TTUR, StyleGAN, pytorch-fid), so it follows that graph, not the Keras/torchvision Inception-v3:
  * every conv is conv(no bias) -> BatchNormWithGlobalNormalization(eps 1e-3, no gamma) -> ReLU;
  * pool branches of mixed .. mixed_9 use an *exclusive* 3x3 average pool (TF SAME padding does not
    count padded zeros); mixed_10's pool branch is a 3x3 max pool (a quirk of the 2015 graph);
  * TF padding per op (SAME or VALID), kept explicit in the layer table below;
  * pool_3 is an 8x8 VALID average pool -> 2048 features; sFID uses `mixed_6/conv` (the 1x1 branch
    of mixed_6, 17x17x192) restricted to its first 7 channels; IS uses softmax(pool_3 @ W) where W is
    `softmax/weights` WITHOUT the bias, as the ADM evaluator does.

Parameter names follow the TF graph scopes: params['mixed_9']['tower']['mixed']['conv_1'] holds
`conv2d_params` (HWIO, as in the graph) and `batchnorm/{beta,gamma,moving_mean,moving_variance}`; the
flat '/'-joined key of a leaf is its canonical name (see weights.py). The input is the *preprocessed*
image batch (preprocess.py: TF1-legacy bilinear resize to 299x299 and (x - 128) / 128), NHWC.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BN_EPS = 1e-3  # variance_epsilon of every batchnorm node of the 2015 graph
INPUT_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008  # the 2015 graph's softmax has 1008 outputs (1000 classes + 8 unused)
SPATIAL_CHANNELS = 7  # ADM's sFID: mixed_6/conv[..., :7]
SPATIAL_SHAPE = (17, 17)


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One conv->BN->ReLU node of the graph: `scope` is its TF scope relative to the block."""

    scope: str
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: str = "SAME"


def _c(scope, features, kh, kw=None, stride=1, padding="SAME"):
    return ConvSpec(scope, features, (kh, kh if kw is None else kw), stride, padding)


# Stem, in graph order. Pools: `pool` and `pool_1` are 3x3/2 VALID max pools after conv_2 / conv_4.
STEM = (
    _c("conv", 32, 3, stride=2, padding="VALID"),
    _c("conv_1", 32, 3, padding="VALID"),
    _c("conv_2", 64, 3, padding="SAME"),
    _c("conv_3", 80, 1, padding="VALID"),
    _c("conv_4", 192, 3, padding="VALID"),
)

# (block scope, block type, argument): A takes the pool branch width, C the 7x7 tower width,
# E the pool type of its pool branch.
BLOCKS = (
    ("mixed", "A", 32),
    ("mixed_1", "A", 64),
    ("mixed_2", "A", 64),
    ("mixed_3", "B", None),
    ("mixed_4", "C", 128),
    ("mixed_5", "C", 160),
    ("mixed_6", "C", 160),
    ("mixed_7", "C", 192),
    ("mixed_8", "D", None),
    ("mixed_9", "E", "avg"),
    ("mixed_10", "E", "max"),
)


def block_convs(kind: str, arg: Any) -> tuple[ConvSpec, ...]:
    """The convs of one mixed block, scopes relative to the block, in graph order."""
    if kind == "A":
        return (
            _c("conv", 64, 1),
            _c("tower/conv", 48, 1), _c("tower/conv_1", 64, 5),
            _c("tower_1/conv", 64, 1), _c("tower_1/conv_1", 96, 3), _c("tower_1/conv_2", 96, 3),
            _c("tower_2/conv", arg, 1),
        )
    if kind == "B":
        return (
            _c("conv", 384, 3, stride=2, padding="VALID"),
            _c("tower/conv", 64, 1), _c("tower/conv_1", 96, 3),
            _c("tower/conv_2", 96, 3, stride=2, padding="VALID"),
        )
    if kind == "C":
        return (
            _c("conv", 192, 1),
            _c("tower/conv", arg, 1), _c("tower/conv_1", arg, 1, 7), _c("tower/conv_2", 192, 7, 1),
            _c("tower_1/conv", arg, 1), _c("tower_1/conv_1", arg, 7, 1), _c("tower_1/conv_2", arg, 1, 7),
            _c("tower_1/conv_3", arg, 7, 1), _c("tower_1/conv_4", 192, 1, 7),
            _c("tower_2/conv", 192, 1),
        )
    if kind == "D":
        return (
            _c("tower/conv", 192, 1), _c("tower/conv_1", 320, 3, stride=2, padding="VALID"),
            _c("tower_1/conv", 192, 1), _c("tower_1/conv_1", 192, 1, 7), _c("tower_1/conv_2", 192, 7, 1),
            _c("tower_1/conv_3", 192, 3, stride=2, padding="VALID"),
        )
    if kind == "E":
        return (
            _c("conv", 320, 1),
            _c("tower/conv", 384, 1), _c("tower/mixed/conv", 384, 1, 3), _c("tower/mixed/conv_1", 384, 3, 1),
            _c("tower_1/conv", 448, 1), _c("tower_1/conv_1", 384, 3),
            _c("tower_1/mixed/conv", 384, 1, 3), _c("tower_1/mixed/conv_1", 384, 3, 1),
            _c("tower_2/conv", 192, 1),
        )
    raise ValueError(f"unknown Inception block type {kind!r}; expected one of A, B, C, D, E")


def all_convs() -> list[ConvSpec]:
    """Every conv of the graph with its full TF scope (e.g. 'mixed_6/tower_1/conv_3')."""
    out = list(STEM)
    for scope, kind, arg in BLOCKS:
        out += [dataclasses.replace(c, scope=f"{scope}/{c.scope}") for c in block_convs(kind, arg)]
    return out


def pool_ops() -> dict[str, str]:
    """Pooling nodes of the graph -> 'max' / 'avg' (checked against a GraphDef when one is loaded)."""
    ops = {"pool": "max", "pool_1": "max", "pool_3": "avg"}
    for scope, kind, arg in BLOCKS:
        if kind in ("A", "C"):
            ops[f"{scope}/tower_2/pool"] = "avg"
        elif kind in ("B", "D"):
            ops[f"{scope}/pool"] = "max"
        else:
            ops[f"{scope}/tower_2/pool"] = arg
    return ops


class _BatchNorm(nn.Module):
    """BatchNormWithGlobalNormalization at inference: (x - mean) * rsqrt(var + eps) * gamma + beta."""

    features: int

    @nn.compact
    def __call__(self, x):
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        gamma = self.param("gamma", nn.initializers.ones, (self.features,))
        mean = self.param("moving_mean", nn.initializers.zeros, (self.features,))
        var = self.param("moving_variance", nn.initializers.ones, (self.features,))
        scale = gamma * jax.lax.rsqrt(var + BN_EPS)
        return (x.astype(jnp.float32) - mean) * scale + beta


class ConvBN(nn.Module):
    """conv2d (no bias) -> batchnorm -> relu, named like the TF node (`conv2d_params`, `batchnorm`)."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: str = "SAME"
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "conv2d_params", nn.initializers.lecun_normal(), (*self.kernel, x.shape[-1], self.features)
        )
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
            preferred_element_type=jnp.float32,
        )
        return nn.relu(_BatchNorm(self.features, name="batchnorm")(y))


def _avg_pool_exclusive(x):
    # TF AvgPool with SAME padding divides by the number of valid pixels in the window.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)


def _max_pool(x, stride, padding):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class _Scope(nn.Module):
    """A TF name scope holding convs (and nested scopes) applied in sequence or in parallel.

    `convs` carry scopes relative to this one, in graph order; 'mixed/conv' lives in the child scope
    'mixed'. The E-block towers end in a 'mixed' scope whose two convs run in parallel and concat.
    """

    convs: tuple[ConvSpec, ...]
    parallel: bool = False
    pool: str | None = None  # pool applied to the input first (the 'tower_2' branches)
    divisor: int = 1
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    def _conv(self, spec: ConvSpec, name: str):
        return ConvBN(spec.features // self.divisor, spec.kernel, spec.stride, spec.padding,
                      self.dtype, self.precision, name=name)

    @nn.compact
    def __call__(self, x):
        if self.pool == "avg":
            x = _avg_pool_exclusive(x)
        elif self.pool == "max":
            x = _max_pool(x, 1, "SAME")
        direct = [c for c in self.convs if "/" not in c.scope]
        nested = [c for c in self.convs if "/" in c.scope]
        if self.parallel:
            return jnp.concatenate([self._conv(c, c.scope)(x) for c in direct], axis=-1)
        for c in direct:
            x = self._conv(c, c.scope)(x)
        if nested:  # only 'mixed/conv', 'mixed/conv_1' in the E blocks
            inner = tuple(dataclasses.replace(c, scope=c.scope.split("/", 1)[1]) for c in nested)
            x = _Scope(inner, parallel=True, divisor=self.divisor, dtype=self.dtype,
                       precision=self.precision, name=nested[0].scope.split("/", 1)[0])(x)
        return x


class _Block(nn.Module):
    kind: str
    arg: Any
    divisor: int = 1
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        convs = block_convs(self.kind, self.arg)
        branches: dict[str, list[ConvSpec]] = {}
        for c in convs:
            head, _, rest = c.scope.partition("/")
            key = head if rest else ""
            branches.setdefault(key, []).append(dataclasses.replace(c, scope=rest or head))
        kw = dict(divisor=self.divisor, dtype=self.dtype, precision=self.precision)
        outs = []
        if "" in branches:  # the direct 1x1 / 3x3 'conv' branch
            (spec,) = branches.pop("")
            outs.append(ConvBN(spec.features // self.divisor, spec.kernel, spec.stride, spec.padding,
                               self.dtype, self.precision, name=spec.scope)(x))
        for name, specs in branches.items():
            pool = None
            if name == "tower_2":
                pool = "avg" if self.kind in ("A", "C") else self.arg
            outs.append(_Scope(tuple(specs), pool=pool, name=name, **kw)(x))
        if self.kind in ("B", "D"):  # the parameter-free 'pool' branch, last in the concat
            outs.append(_max_pool(x, 2, "VALID"))
        return jnp.concatenate(outs, axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3. Input: preprocessed NHWC float images (N, 299, 299, 3).

    Returns {'pool_3': (N, 2048), 'spatial': (N, 17*17*7) = mixed_6/conv[..., :7] flattened in HWC
    order as ADM does, and 'logits': (N, 1008) = pool_3 @ softmax/weights (no bias) if with_logits}.
    `channel_divisor` shrinks every conv (tests only); `dtype` is the conv compute dtype (keep
    float32 for reported numbers); precision HIGHEST keeps fp32 convs exact on TPU/GPU.
    """

    with_logits: bool = False
    channel_divisor: int = 1
    dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x) -> dict[str, jax.Array]:
        if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"InceptionV3 expects preprocessed (N, 299, 299, 3) images, got shape {x.shape}; "
                             "run iar_jax.evaluation.preprocess.preprocess_images first")
        kw = dict(dtype=self.dtype, precision=self.precision)
        d = self.channel_divisor

        def conv(spec: ConvSpec, y):
            return ConvBN(spec.features // d, spec.kernel, spec.stride, spec.padding, name=spec.scope, **kw)(y)

        x = conv(STEM[0], x)
        x = conv(STEM[1], x)
        x = conv(STEM[2], x)
        x = _max_pool(x, 2, "VALID")  # pool
        x = conv(STEM[3], x)
        x = conv(STEM[4], x)
        x = _max_pool(x, 2, "VALID")  # pool_1
        spatial = None
        for scope, kind, arg in BLOCKS:
            block = _Block(kind, arg, divisor=d, name=scope, **kw)
            x = block(x)
            if scope == "mixed_6":
                # mixed_6/conv is the block's first concat input: its direct 1x1 branch.
                spatial = x[..., :SPATIAL_CHANNELS]
        pool3 = nn.avg_pool(x, (8, 8), strides=(8, 8), padding="VALID")
        pool3 = pool3.reshape(pool3.shape[0], -1)
        out = {"pool_3": pool3.astype(jnp.float32),
               "spatial": spatial.reshape(spatial.shape[0], -1).astype(jnp.float32)}
        if self.with_logits:
            w = self.param("softmax", _softmax_init, (pool3.shape[-1], NUM_CLASSES))
            out["logits"] = jnp.dot(pool3, w["weights"], precision=self.precision)
        return out


def _softmax_init(key, shape):
    return {"weights": nn.initializers.lecun_normal()(key, shape, jnp.float32)}


def expected_shapes(with_logits: bool, channel_divisor: int = 1) -> dict[str, tuple[int, ...]]:
    """Canonical flat name -> shape for every parameter the network uses (walks the layer table)."""
    d = channel_divisor
    shapes: dict[str, tuple[int, ...]] = {}

    def add(scope: str, spec: ConvSpec, cin: int) -> int:
        cout = spec.features // d
        shapes[f"{scope}/conv2d_params"] = (*spec.kernel, cin, cout)
        for leaf in ("beta", "gamma", "moving_mean", "moving_variance"):
            shapes[f"{scope}/batchnorm/{leaf}"] = (cout,)
        return cout

    c = 3
    for spec in STEM:
        c = add(spec.scope, spec, c)
    for block, kind, arg in BLOCKS:
        last: dict[str, int] = {}  # tower -> channels of its running output
        mixed: dict[str, int] = {}  # tower -> channels of its parallel 'mixed' convs (E blocks)
        out = c if kind in ("B", "D") else 0  # the parameter-free max-pool branch
        for spec in block_convs(kind, arg):
            parts = spec.scope.split("/")
            scope = f"{block}/{spec.scope}"
            if len(parts) == 1:
                out += add(scope, spec, c)
            elif parts[1] == "mixed":
                mixed[parts[0]] = mixed.get(parts[0], 0) + add(scope, spec, last[parts[0]])
            else:
                last[parts[0]] = add(scope, spec, last.get(parts[0], c))
        out += sum(mixed.get(t, ch) for t, ch in last.items())
        c = out
    if with_logits:
        shapes["softmax/weights"] = (c, NUM_CLASSES)
    return shapes


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", k)))


def params_from_flat(flat: Mapping[str, np.ndarray]) -> dict:
    """Canonical flat dict ('mixed/tower/conv/conv2d_params' -> array) -> nested Flax params.

    Keys the network does not use (e.g. 'softmax/biases') are dropped.
    """
    tree: dict = {}
    for name, value in flat.items():
        if name == "softmax/biases":
            continue
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value, jnp.float32)
    return tree


def flat_from_params(params: Mapping) -> dict[str, np.ndarray]:
    """Nested Flax params -> canonical flat dict (inverse of params_from_flat)."""
    return {"/".join(_key_name(k) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def conv_specs_by_scope() -> dict[str, ConvSpec]:
    return {c.scope: c for c in all_convs()}


def random_flat_params(seed: int, with_logits: bool = True, channel_divisor: int = 1,
                       dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights in the canonical layout (tests; synthetic weight files)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(with_logits, channel_divisor).items():
        leaf = name.rsplit("/", 1)[1]
        if leaf == "conv2d_params":
            fan_in = int(np.prod(shape[:3]))
            v = rng.normal(0, 1.0 / np.sqrt(fan_in), shape)
        elif leaf == "moving_variance":
            v = rng.uniform(0.5, 1.5, shape)
        elif leaf == "gamma":
            v = np.ones(shape)
        elif leaf == "weights":
            v = rng.normal(0, 0.05, shape)
        else:
            v = rng.normal(0, 0.1, shape)
        out[name] = v.astype(dtype)
    return out


__all__: Sequence[str] = (
    "InceptionV3", "ConvSpec", "all_convs", "pool_ops", "expected_shapes", "params_from_flat",
    "flat_from_params", "random_flat_params", "BN_EPS", "INPUT_SIZE", "POOL_DIM", "NUM_CLASSES",
)
