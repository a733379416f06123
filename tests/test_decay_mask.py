"""optim.decay: the tensors AdamW decays, against hand-written lists of what the official scripts
decay (reference names, mapped onto ours through the checkpoint converters)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iar_jax import trainer as trainer_lib
from iar_jax.config_lib import load_config
from iar_jax.convert import gpt as gpt_convert, iar2_gpt as iar2_convert
from iar_jax.models.families import get_family

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A LlamaGen TransformerBlock's >= 2-D tensors (its two RMSNorm weights are 1-D and named *norm).
BLOCK_DECAYED = ("attention.wqkv.weight", "attention.wo.weight",
                 "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")

# IAR2 gpt_train.py (tiny: 2 trunk layers, 2 factorized blocks). train_c2i_ddp.py decays p.dim() >= 2:
IAR2_NDIM = [
    "cls_embedding.embedding_table.weight", "tok_embeddings1.weight", "tok_embeddings2.weight",
    "aggregation_layer.0.weight", "aggregation_layer.2.weight",
    "mlp1.0.weight", "mlp1.2.weight", "mlp2.0.weight", "mlp2.2.weight",
    "output1.0.weight", "output1.2.weight", "output2.0.weight", "output2.2.weight",
] + [f"{p}.{i}.{t}" for p in ("layers", "factorized_blocks") for i in range(2) for t in BLOCK_DECAYED]
# train_c2i_fsdp.py decays every name without "norm": the same plus the six biases.
IAR2_BIASES = ["aggregation_layer.0.bias", "aggregation_layer.2.bias", "mlp1.0.bias", "mlp2.0.bias",
               "output1.0.bias", "output2.0.bias"]
IAR2_DECAYED = {"ndim": IAR2_NDIM, "not_norm": IAR2_NDIM + IAR2_BIASES}
# The same biases in our names (fusion / local_context / output MLPs).
OUR_BIASES = {("fusion", "fc1", "bias"), ("fusion", "fc2", "bias"), ("local_context", "mlp1", "fc1", "bias"),
              ("local_context", "mlp2", "fc1", "bias"), ("sem_output", "fc1", "bias"), ("det_output", "fc1", "bias")}

# IAR gpt.py (tiny: 2 layers) under train_c2i.py's p.dim() >= 2; it has no biases.
IAR_DECAYED = ["cls_embedding.embedding_table.weight", "tok_embeddings.weight", "output.weight"] + [
    f"layers.{i}.{t}" for i in range(2) for t in BLOCK_DECAYED]


def _config(family):
    return load_config(os.path.join(ROOT, "configs", f"{family}.py:tiny"))


def _boxed_params(config):
    fam = get_family(config.model_family)
    module, model_cfg = fam.build(config)
    dummy = {k: jnp.zeros((1,) + tuple(s), d) for k, (s, d) in fam.batch_spec(config).items()}
    return jax.eval_shape(lambda: fam.init(module, jax.random.PRNGKey(0), dummy))["params"], model_cfg


def _flat(tree):
    return {tuple(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _expected_mask(converter, model_cfg, decayed_names):
    """Our param path -> decayed, from the reference names; every layer of a stacked leaf must agree."""
    decayed_names = set(decayed_names)
    rules = converter.rules(model_cfg)
    assert decayed_names <= set(rules), sorted(decayed_names - set(rules))
    by_path = {}
    for name, rule in rules.items():
        by_path.setdefault(rule.path, set()).add(name in decayed_names)
    assert all(len(v) == 1 for v in by_path.values()), {p: v for p, v in by_path.items() if len(v) > 1}
    return {p: v.pop() for p, v in by_path.items()}


@pytest.fixture(scope="module")
def iar2_tiny():
    return _boxed_params(_config("iar2"))


@pytest.mark.parametrize("rule", ["ndim", "not_norm"])
def test_iar2_mask_matches_official_scripts(iar2_tiny, rule):
    boxed, model_cfg = iar2_tiny
    mask = _flat(trainer_lib.decay_mask(boxed, rule))
    expected = _expected_mask(iar2_convert, model_cfg, IAR2_DECAYED[rule])
    assert set(mask) == set(expected)  # every param is covered by a reference tensor
    assert {p for p, d in mask.items() if d} == {p for p, d in expected.items() if d}


def test_iar2_rules_differ_by_the_six_head_biases(iar2_tiny):
    boxed, _ = iar2_tiny
    ndim, not_norm = (_flat(trainer_lib.decay_mask(boxed, r)) for r in ("ndim", "not_norm"))
    assert {p for p in ndim if not_norm[p] != ndim[p]} == OUR_BIASES
    assert all(not_norm[p] and not ndim[p] for p in OUR_BIASES)


def test_iar_mask_matches_train_c2i_under_both_rules():
    boxed, model_cfg = _boxed_params(_config("iar"))
    expected = {p for p, d in _expected_mask(gpt_convert, model_cfg, IAR_DECAYED).items() if d}
    for rule in ("ndim", "not_norm"):
        assert {p for p, d in _flat(trainer_lib.decay_mask(boxed, rule)).items() if d} == expected, rule


def test_trainer_uses_the_config_rule(iar2_tiny):
    config = _config("iar2")
    assert config.optim.decay == "not_norm" and _config("iar").optim.decay == "ndim"
    mask = _flat(trainer_lib.Trainer(config, jax.devices()[:1]).decay_mask)
    expected = _expected_mask(iar2_convert, iar2_tiny[1], IAR2_DECAYED["not_norm"])
    assert {p for p, d in mask.items() if d} == {p for p, d in expected.items() if d}


@pytest.mark.parametrize("rule", ["ndim", "not_norm"])
def test_adamw_step_decays_the_masked_params(rule):
    """Zero gradients from all-ones params: Adam's own update is 0, so a step leaves 1 - lr·wd on the
    decayed tensors and 1 elsewhere (plain arrays, as after nn.unbox)."""
    config = _config("iar2")
    params = {"fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "norm": {"weight": jnp.ones(3)}}
    tx, _ = trainer_lib.make_optimizer(config.optim, 10, trainer_lib.decay_mask(params, rule))
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
    d = 1.0 - 3e-4 * 0.05  # configs/iar2.py: lr 3e-4 (step 0 of the cosine), weight decay 0.05
    expected = {("fc", "kernel"): d, ("fc", "bias"): d if rule == "not_norm" else 1.0, ("norm", "weight"): 1.0}
    for path, u in _flat(updates).items():
        np.testing.assert_allclose(1.0 + np.asarray(u), expected[path], rtol=1e-7, err_msg=str(path))


def test_unknown_rule_names_the_choices(iar2_tiny):
    with pytest.raises(ValueError, match=r"unknown optim.decay 'bias'; use ndim .* or not_norm"):
        trainer_lib.decay_mask(iar2_tiny[0], "bias")
