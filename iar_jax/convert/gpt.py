"""LlamaGen / IAR GPT state dict <-> Flax `iar_jax.models.gpt.GPT` params (kind `llamagen_gpt`).

torch Linear weights are [out, in]; Flax kernels are [in, out], with the fused qkv kernel kept
as [dim, 3, heads, head_dim] and wo as [heads, head_dim, dim] so heads can be tensor-sharded.
"""

from iar_jax.convert.common import Rule, register


def _lin(path, **kw):
    return Rule(path, to_flax=lambda w: w.T, to_torch=lambda k: k.T, **kw)


def block_rules(prefix: str, layer_path, dim: int, n_head: int, stack_index=None):
    """Rules of one LlamaGen TransformerBlock (reused by the IAR2 converter)."""
    hd = dim // n_head
    p = tuple(layer_path)
    return {
        f"{prefix}.attention.wqkv.weight": Rule(
            p + ("attention", "wqkv", "kernel"),
            to_flax=lambda w: w.T.reshape(dim, 3, n_head, hd),
            to_torch=lambda k: k.reshape(dim, 3 * n_head * hd).T,
            stack_index=stack_index),
        f"{prefix}.attention.wo.weight": Rule(
            p + ("attention", "wo", "kernel"),
            to_flax=lambda w: w.T.reshape(n_head, hd, dim),
            to_torch=lambda k: k.reshape(n_head * hd, dim).T,
            stack_index=stack_index),
        f"{prefix}.feed_forward.w1.weight": _lin(p + ("feed_forward", "w1", "kernel"), stack_index=stack_index),
        f"{prefix}.feed_forward.w2.weight": _lin(p + ("feed_forward", "w2", "kernel"), stack_index=stack_index),
        f"{prefix}.feed_forward.w3.weight": _lin(p + ("feed_forward", "w3", "kernel"), stack_index=stack_index),
        f"{prefix}.attention_norm.weight": Rule(p + ("attention_norm", "weight"), stack_index=stack_index),
        f"{prefix}.ffn_norm.weight": Rule(p + ("ffn_norm", "weight"), stack_index=stack_index),
    }


def stack_rules(cfg, torch_prefix: str, flax_path, n_layer: int):
    """Rules for `n_layer` blocks under `torch_prefix.{i}` in a TransformerStack at `flax_path`."""
    rules = {}
    for i in range(n_layer):
        if cfg.scan_layers:
            rules.update(block_rules(f"{torch_prefix}.{i}", tuple(flax_path) + ("layers", "block"), cfg.dim, cfg.n_head, i))
        else:
            rules.update(block_rules(f"{torch_prefix}.{i}", tuple(flax_path) + (f"layers_{i}",), cfg.dim, cfg.n_head))
    return rules


def rules(cfg):
    r = {
        "cls_embedding.embedding_table.weight": Rule(("cls_embedding", "embedding_table")),
        "tok_embeddings.weight": Rule(("tok_embeddings", "embedding")),
        "norm.weight": Rule(("transformer", "norm", "weight")),
        "output.weight": _lin(("output", "kernel")),
    }
    r.update(stack_rules(cfg, "layers", ("transformer",), cfg.n_layer))
    return r


def abstract_params(cfg):
    from iar_jax.models.gpt import abstract_params as ap

    return ap(cfg)


register("llamagen_gpt", rules, abstract_params)
