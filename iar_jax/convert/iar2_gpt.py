"""Official IAR2 GPT state dict <-> Flax `iar_jax.models.iar2.IAR2` params (kind `iar2_gpt`).

Reference key -> Flax part: tok_embeddings1/2 -> sem/det_embedding, aggregation_layer.{0,2} ->
fusion.fc{1,2}, layers.{i} -> trunk, factorized_blocks.{i} + norm -> head, mlp1/mlp2.{0,2} ->
local_context.mlp{1,2}.fc{1,2}, output1/output2.{0,2} -> sem/det_output.fc{1,2}. Linear weights
are transposed ([out, in] -> [in, out]); blocks reuse the LlamaGen rules.
Released checkpoints were trained with the reference RoPE layout: load them with
`model.official_rope=True` (the converter cannot see it; it changes no parameter).
"""
from iar_jax.convert.common import Rule, register
from iar_jax.convert.gpt import stack_rules


def _lin(path):
    return Rule(path, to_flax=lambda w: w.T, to_torch=lambda k: k.T)


def _mlp(torch_prefix, flax_path, out_bias: bool):
    p = tuple(flax_path)
    r = {
        f"{torch_prefix}.0.weight": _lin(p + ("fc1", "kernel")),
        f"{torch_prefix}.0.bias": Rule(p + ("fc1", "bias")),
        f"{torch_prefix}.2.weight": _lin(p + ("fc2", "kernel")),
    }
    if out_bias:
        r[f"{torch_prefix}.2.bias"] = Rule(p + ("fc2", "bias"))
    return r


def rules(cfg):
    r = {
        "cls_embedding.embedding_table.weight": Rule(("cls_embedding", "embedding_table")),
        "tok_embeddings1.weight": Rule(("sem_embedding", "embedding")),
        "tok_embeddings2.weight": Rule(("det_embedding", "embedding")),
        "norm.weight": Rule(("head", "norm", "weight")),
    }
    r.update(_mlp("aggregation_layer", ("fusion",), out_bias=True))
    r.update(_mlp("mlp1", ("local_context", "mlp1"), out_bias=False))
    r.update(_mlp("mlp2", ("local_context", "mlp2"), out_bias=False))
    r.update(_mlp("output1", ("sem_output",), out_bias=False))
    r.update(_mlp("output2", ("det_output",), out_bias=False))
    r.update(stack_rules(cfg, "layers", ("trunk",), cfg.n_layer))
    r.update(stack_rules(cfg, "factorized_blocks", ("head",), cfg.head_layers))
    return r


def abstract_params(cfg):
    from iar_jax.models.iar2 import abstract_params as ap

    return ap(cfg)


register("iar2_gpt", rules, abstract_params)
