"""Benchmark costs of each model family (`iar_jax.costs`: train FLOPs, bytes a sampling position
reads), against counts done by hand from the tiny architectures."""
import pytest

from iar_jax import costs
from iar_jax.config_lib import load_config
from iar_jax.models.families import get_family


def _model_cfg(arg):
    config = load_config(arg)
    return get_family(config.model_family).build(config)[1]


def _block(d, ffn):  # matmul weights of one LlamaGen block: wqkv, wo, w1, w3, w2
    return d * 3 * d + d * d + 3 * d * ffn


def test_iar_train_flops_hand_count():
    cfg = _model_cfg("configs/iar.py:tiny")  # d 64, 2 layers, 4 heads, ffn 256, vocab 256, 4x4 grid
    B, seq = 3, 1 + 16 - 1  # class token + the first T-1 of 16 codes
    params = 2 * (_block(64, 256) + 2 * 64) + 64 + 64 * 256  # blocks + norms, final norm, output
    attn = 2 * 2 * 4 * seq * seq * 16  # QK^T and PV, 2 layers, 4 heads of 16
    assert costs.train_flops("iar", cfg, B) == pytest.approx(6 * B * (params * seq + attn), rel=1e-12)


def test_iar2_train_flops_hand_count():
    cfg = _model_cfg("configs/iar2.py:tiny")  # d 96, 2+2 layers, ffn 256, vocabs 16/64, 4x4 grid
    B, T, d = 3, 16, 96
    fusion = 2 * d * 4 * d + 4 * d * d
    window = (d * 24 + 24 * 8) + (12 * 8 * 2 * d + 2 * d * d)  # mlp1 per slot, mlp2 over 12 slots
    outputs = (d * 2 * d + 2 * d * 16) + (d * 2 * d + 2 * d * 64)
    dense = fusion * (T - 1) + 2 * _block(d, 256) * T + window * T + 2 * _block(d, 256) * 3 * T + outputs * T
    attn = 2 * d * (2 * T * T + 2 * T * 3 * 3)  # trunk over T, head over T sequences of 3
    assert costs.train_flops("iar2", cfg, B) == pytest.approx(6 * B * (dense + attn), rel=1e-12)


def test_iar2_decode_bytes_hand_count():
    from iar_jax.models.iar2 import abstract_params

    cfg = _model_cfg("configs/iar2.py:tiny")
    d, T, rows = 96, 16, 4
    block = _block(d, 256) + 2 * d  # + two norms
    once = (2 * d * 4 * d + 4 * d + 4 * d * d + d) + 2 * block \
        + (d * 24 + 24 + 24 * 8) + (12 * 8 * 2 * d + 2 * d + 2 * d * d) \
        + (d * 2 * d + 2 * d + 2 * d * 16) + (d * 2 * d + 2 * d + 2 * d * 64)
    head = 2 * block + d  # + the final norm; the head runs twice per position
    cost = costs.decode_bytes("iar2", cfg, abstract_params(cfg), rows, "bfloat16")
    assert cost["weights"] == 2 * (once + 2 * head)
    head_kv = 2 * 2 * rows * 3 * d * 2
    assert cost["kv_full"] == 2 * 2 * rows * T * d * 2 + head_kv
    assert cost["kv_avg"] == 2 * 2 * rows * (T + 1) / 2 * d * 2 + head_kv


def test_iar_decode_bytes_hand_count():
    from iar_jax.models.gpt import abstract_params

    cfg = _model_cfg("configs/iar.py:tiny")
    rows = 4
    weights = 2 * (_block(64, 256) + 2 * 64) + 64 + 64 * 256  # the embedding tables are gathered, not read
    cost = costs.decode_bytes("iar", cfg, abstract_params(cfg), rows, "bfloat16")
    assert cost["weights"] == 2 * weights
    assert cost["kv_full"] == 2 * 2 * rows * (1 + 16) * 64 * 2  # K and V, 2 layers, class token + 16 codes
    assert cost["kv_avg"] == 2 * 2 * rows * (1 + 16 / 2) * 64 * 2


def test_unknown_family_is_a_one_line_error():
    with pytest.raises(ValueError, match="no cost model for model_family 'llamagen'; costs are known for"):
        costs.train_flops("llamagen", None, 1)
