"""IAR2's autoregressive model (arXiv 2510.06928; SPEC §5, §6) and its model family.

Each image position carries a semantic id k (vocab 256) and a detail id j (vocab 4096):
  * input fusion: one token per position, e = MLP(concat(E_s[k], E_d[j]));
  * trunk: LlamaGen blocks over [class, e_0 .. e_{T-2}] give h_t, the state that predicts (k_t, j_t);
    the reference has NO final norm on the trunk;
  * local context (`iar_jax.models.local_context`): 12 causal neighbours of h_t compressed into h_ctx;
  * head: 5 blocks over the 3-token causal sequence [h_ctx, h_t, E_s(k_t)], then the one final
    RMSNorm; semantic logits from position 1, detail logits from position 2;
  * loss = w1·CE(semantic) + CE(detail).

Parameter names follow the paper's parts; `iar_jax.convert.iar2_gpt` maps them to the reference
keys (tok_embeddings1/2, aggregation_layer, layers, factorized_blocks, mlp1/2, output1/2, norm).

Sampling (`sampling_step_fns`, for `iar_jax.sampling.sampler`) is per position: trunk step with KV cache →
window from a buffer of (compressed) past trunk outputs → head: sample k_t (semantic guidance) →
feed E_s(k_t) → sample j_t (detail guidance) → next trunk input fusion(E_s(k_t), E_d(j_t)).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iar_jax.models import families
from iar_jax.cluster_loss import token_ce
from iar_jax.models.local_context import MLP, LocalContext, grid_side
from iar_jax.models.gpt import GPTConfig, LabelEmbedder, TransformerStack, init_cache, rope_table_2d

Array = jax.Array
_INIT = nn.initializers.normal(stddev=0.02)
HEAD_LEN = 3  # [h_ctx, h_t, E_s(k_t)]


@dataclasses.dataclass(frozen=True)
class IAR2Config(GPTConfig):
    """GPTConfig's block fields (shared by trunk and head) plus the IAR2 ones."""

    vocab_size: int = 256  # semantic codebook C_S
    grid_size: int = 24  # the reference's window is fixed at 24x24 (384 px); any square grid here
    detail_vocab_size: int = 4096  # detail codebook C_D
    head_layers: int = 5  # reference `factorized_n_layer`
    # The released code's RoPE layout: trunk position p ≥ 1 takes grid cell ⌊(p−1)/2⌋ (each cell
    # repeated twice) and the head takes table rows 0–2 (zeros, cell 0, cell 0). Released weights
    # were trained with it, so it is the default (parity); False = the proper 2D layout (cell p−1;
    # head rows 0–2 of that table), for new training runs only.
    official_rope: bool = True

    def validate(self) -> "IAR2Config":
        super().validate()
        if self.cls_token_num != 1:
            raise ValueError(f"IAR2 supports one class token (cls_token_num={self.cls_token_num}); set model.cls_token_num=1")
        if self.grid_size < 2:
            raise ValueError(f"model.grid_size={self.grid_size} is too small; IAR2 needs a grid of at least 2x2 tokens")
        if self.dim < 12:
            raise ValueError(f"model.dim={self.dim} is below 12; the window compresses each neighbour to dim//12 features")
        if self.head_layers < 1:
            raise ValueError(f"model.head_layers={self.head_layers} must be ≥ 1 (the reference uses 5)")
        return self


def rope_tables(cfg: IAR2Config) -> Tuple[np.ndarray, np.ndarray]:
    """(trunk table [seq_len, hd/2, 2], head table [3, hd/2, 2])."""
    table = rope_table_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num)
    if cfg.official_rope:
        # Reference `precompute_freqs_cis_2d` with `repeat_interleave(2)` on the grid cells.
        table = np.concatenate([table[: cfg.cls_token_num], np.repeat(table[cfg.cls_token_num:], 2, axis=0)])
    return table[: cfg.seq_len], table[:HEAD_LEN]


class IAR2(nn.Module):
    cfg: IAR2Config

    def setup(self):
        cfg = self.cfg
        dt = cfg.compute_dtype
        d = cfg.dim
        self.cls_embedding = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout)
        emb_init = nn.with_logical_partitioning(_INIT, ("vocab", "embed"))
        self.sem_embedding = nn.Embed(cfg.vocab_size, d, embedding_init=emb_init, param_dtype=jnp.float32)
        self.det_embedding = nn.Embed(cfg.detail_vocab_size, d, embedding_init=emb_init, param_dtype=jnp.float32)
        self.fusion = MLP(4 * d, d, out_bias=True, axes=("embed", "mlp", "embed"), dtype=dt)
        self.trunk = TransformerStack(cfg, final_norm=False)  # the reference trunk has no final norm
        self.local_context = LocalContext(d, cfg.grid_size, cfg.grid_size, dtype=dt)
        self.head = TransformerStack(cfg, n_layer=cfg.head_layers)  # blocks + the shared final RMSNorm
        self.sem_output = MLP(2 * d, cfg.vocab_size, out_bias=False, zero_init_out=True,
                              axes=("embed", "mlp", "vocab"), dtype=dt)
        self.det_output = MLP(2 * d, cfg.detail_vocab_size, out_bias=False, zero_init_out=True,
                              axes=("embed", "mlp", "vocab"), dtype=dt)
        self.token_drop = nn.Dropout(cfg.token_dropout)
        trunk_rope, head_rope = rope_tables(cfg)
        self.trunk_rope = jnp.asarray(trunk_rope)
        self.head_rope = jnp.asarray(head_rope)

    # -- pieces -------------------------------------------------------------------------------
    def fuse(self, sem, det):
        """Input fusion of ids [...] -> [..., D]."""
        e = jnp.concatenate([self.sem_embedding(sem), self.det_embedding(det)], axis=-1)
        return self.fusion(e.astype(self.cfg.compute_dtype))

    def _logits(self, mlp, x, axes):
        return nn.with_logical_constraint(mlp(x).astype(jnp.float32), axes)

    # -- training -----------------------------------------------------------------------------
    def __call__(self, codes: Array, detail_codes: Array, labels: Array, *, train: bool = False):
        """codes / detail_codes [B, T] int, labels [B] -> (semantic [B, T, Vs], detail [B, T, Vd]) fp32;
        position t predicts (codes[:, t], detail_codes[:, t])."""
        cfg = self.cfg
        dt = cfg.compute_dtype
        B, T = codes.shape
        if grid_side(T) != cfg.grid_size:
            raise ValueError(f"codes have {T} tokens but model.grid_size={cfg.grid_size} expects {cfg.num_tokens}; "
                             "set --config.model.grid_size to the codes' grid side")
        if detail_codes.shape != codes.shape:
            raise ValueError(f"detail_codes shape {detail_codes.shape} differs from codes shape {codes.shape}; "
                             "both must come from the same IAR2 tokenizer pass")
        cls = self.cls_embedding(labels, train=train)[:, None, :].astype(dt)
        x = jnp.concatenate([cls, self.fuse(codes[:, :-1], detail_codes[:, :-1]).astype(dt)], axis=1)
        x = self.token_drop(x, deterministic=not train)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        h, _, _ = self.trunk(x, self.trunk_rope[:T], train=train)
        ctx = self.local_context(h)
        e_s = self.sem_embedding(codes).astype(dt)  # teacher-forced k_t (no token dropout, as reference)
        seq = jnp.stack([ctx.astype(dt), h, e_s], axis=2).reshape(B * T, HEAD_LEN, cfg.dim)
        out, _, _ = self.head(seq, self.head_rope, train=train)
        out = out.reshape(B, T, HEAD_LEN, cfg.dim)
        sem = self._logits(self.sem_output, out[:, :, 1], ("act_batch", "act_length", "act_vocab"))
        det = self._logits(self.det_output, out[:, :, 2], ("act_batch", "act_length", "act_vocab"))
        return sem, det

    # -- sampling -----------------------------------------------------------------------------
    def embed_class(self, labels):
        """Trunk input of position 0: the class token [B, D] (null class = num_classes)."""
        return self.cls_embedding(labels, train=False).astype(self.cfg.compute_dtype)

    def trunk_step(self, x, pos, cache):
        """Trunk input x [B, D] at sequence position `pos` -> (h [B, D], cache, a [B]) where a is the
        last layer's head-mean attention weight from this query to the class key."""
        rope = jax.lax.dynamic_slice_in_dim(self.trunk_rope, pos, 1, axis=0)
        h, cache, attn0 = self.trunk(x[:, None].astype(self.cfg.compute_dtype), rope, train=False, cache=cache, start=pos)
        return h[:, 0], cache, attn0

    def head_semantic(self, h, buffer, pos):
        """h [B, D] trunk output at `pos`; buffer [B, T, D//12] compressed past outputs ->
        (semantic logits [B, Vs], buffer with `pos` filled, head KV cache for `head_detail`)."""
        cfg = self.cfg
        c = self.local_context.compress(h).astype(buffer.dtype)
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, c[:, None], pos, axis=1)
        ctx = self.local_context.at(buffer, pos)
        seq = jnp.stack([ctx.astype(h.dtype), h], axis=1)
        cache = init_cache(cfg, h.shape[0], HEAD_LEN, n_layer=cfg.head_layers)
        out, cache, _ = self.head(seq, self.head_rope[:2], train=False, cache=cache, start=0)
        return self.sem_output(out[:, 1]).astype(jnp.float32), buffer, cache

    def head_detail(self, sem, cache):
        """Chosen semantic ids [B] + the head cache -> detail logits [B, Vd]."""
        x = self.sem_embedding(sem)[:, None].astype(self.cfg.compute_dtype)
        out, _, _ = self.head(x, self.head_rope[2:], train=False, cache=cache, start=2)
        return self.det_output(out[:, 0]).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Loss


def iar2_loss(sem_logits, det_logits, codes, detail_codes, semantic_weight: float = 1.0):
    """w1·CE(semantic) + CE(detail) (reference `args.w1 * loss1 + loss2`). Returns (loss, metrics)."""
    ce_s = token_ce(sem_logits, codes)
    ce_d = token_ce(det_logits, detail_codes)
    loss = semantic_weight * ce_s + ce_d
    acc = lambda l, t: jnp.mean((jnp.argmax(l, -1) == t).astype(jnp.float32))
    return loss, {"loss": loss, "semantic_ce": ce_s, "detail_ce": ce_d,
                  "semantic_acc": acc(sem_logits, codes), "detail_acc": acc(det_logits, detail_codes)}


# ----------------------------------------------------------------------------------------------
# Sampling step for the shared sampler (iar_jax.sampling.sampler protocol)

SUB_TOKENS = ("semantic", "detail")


def sampling_step_fns(module: IAR2, cfg: IAR2Config, unroll_layers: bool = True, out_major=None):
    """The IAR2 per-position step for `iar_jax.sampling.sampler`. State: next trunk input x [R, D]
    (the class token first), the trunk KV cache and the buffer of compressed trunk outputs
    [R, T, dim//12] the window reads.

    Step n: trunk at sequence position n → a_n (cond rows) → head over [h_ctx, h_n] → draw k_n with
    the semantic schedule → head continues with E_s(k_n) → draw j_n with the detail schedule →
    x = fusion(E_s(k_n), E_d(j_n)). Both schedules see the same a_n, as in the reference.
    `prepare` casts weights to the compute dtype, (unroll_layers) unstacks the scanned layers and
    (on CPU) makes the blocks' kernels output-major, like `iar_jax.sampling.gpt_step`: takes the
    train-layout params either way."""
    from iar_jax.sampling.gpt_step import constrain_cache, decode_model
    from iar_jax.sampling.sampler import StepFns

    module, cfg, prepare = decode_model(IAR2, cfg, (("trunk", cfg.n_layer), ("head", cfg.head_layers)),
                                        abstract_params, unroll_layers, out_major)

    def init_state(params, rows):
        x = module.apply({"params": params}, rows, method=IAR2.embed_class)
        cache = init_cache(cfg, rows.shape[0], cfg.num_tokens, cfg.compute_dtype)
        cache = constrain_cache(cache)
        buffer = jnp.zeros((rows.shape[0], cfg.num_tokens, cfg.dim // 12), cfg.compute_dtype)
        return {"x": x, "cache": cache, "buffer": buffer}

    def step(params, state, ctx):
        apply = functools.partial(module.apply, {"params": params})
        h, cache, attn0 = apply(state["x"], ctx.n, state["cache"], method=IAR2.trunk_step)
        a = ctx.cond(attn0)
        sem_logits, buffer, head_cache = apply(h, state["buffer"], ctx.n, method=IAR2.head_semantic)
        k = ctx.sample(0, sem_logits, a)
        k_rows = ctx.rows(k)
        det_logits = apply(k_rows, head_cache, method=IAR2.head_detail)
        j = ctx.sample(1, det_logits, a)
        x = apply(k_rows, ctx.rows(j), method=IAR2.fuse).astype(cfg.compute_dtype)
        return {"x": x, "cache": cache, "buffer": buffer}, jnp.stack([k, j], axis=-1)

    return StepFns(num_positions=cfg.num_tokens, null_class=cfg.num_classes, sub_tokens=SUB_TOKENS,
                   init_state=init_state, step=step, vocab_sizes=(cfg.vocab_size, cfg.detail_vocab_size),
                   prepare=prepare)


# ----------------------------------------------------------------------------------------------
# Model family (shared trainer / sampler)


def _build(config):
    cfg = IAR2Config(**families.model_kwargs(IAR2Config, config.model)).validate()
    return IAR2(cfg), cfg


def _spec(config):
    t = int(config.model.grid_size) ** 2
    return {"codes": ((t,), np.int32), "detail_codes": ((t,), np.int32), "labels": ((), np.int32)}


def _make_loss(module, config):
    w1 = float(config.loss.semantic_weight)

    def loss_fn(params, batch, rng, train):
        sem, det = module.apply({"params": params}, batch["codes"], batch["detail_codes"], batch["labels"],
                                train=train, rngs={"dropout": rng})
        return iar2_loss(sem, det, batch["codes"], batch["detail_codes"], w1)

    return loss_fn


def check_batch(batch, config):
    """Host-side checks with one-line errors (missing detail ids, ranges, non-square grids)."""
    m = config.model
    if "detail_codes" not in batch:
        raise ValueError("batch has no 'detail_codes' but model_family 'iar2' needs dual (semantic + detail) codes; "
                         "extract codes with the IAR2 dual tokenizer, or train single-codebook codes with configs/iar.py")
    codes, det = np.asarray(batch["codes"]), np.asarray(batch["detail_codes"])
    if codes.ndim != 2:
        raise ValueError(f"batch['codes'] has shape {codes.shape}; expected [batch, tokens]")
    grid_side(codes.shape[1])
    if det.shape != codes.shape:
        raise ValueError(f"batch['detail_codes'] shape {det.shape} differs from batch['codes'] shape {codes.shape}; "
                         "both must come from the same IAR2 tokenizer pass")
    families.check_ids("class label", np.asarray(batch["labels"]), m.num_classes,
                       "labels must be < config.model.num_classes (the null class is reserved for CFG)")
    families.check_ids("semantic code", codes, m.vocab_size,
                       "semantic codes must come from the IAR2 semantic codebook of config.model.vocab_size entries")
    families.check_ids("detail code", det, m.detail_vocab_size,
                       "detail codes must come from the IAR2 detail codebook of config.model.detail_vocab_size entries")


def _init(module, rng, batch):
    return module.init(rng, batch["codes"], batch["detail_codes"], batch["labels"])


@functools.lru_cache(maxsize=None)
def abstract_params(cfg: IAR2Config):
    """The params tree as ShapeDtypeStructs (unboxed), without allocating."""
    model = IAR2(cfg)
    z = jnp.zeros((1, cfg.num_tokens), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), z, z, jnp.zeros((1,), jnp.int32)))
    return nn.unbox(shapes)["params"]


IAR2_FAMILY = families.register(families.Family("iar2", _build, _spec, _make_loss, check_batch, _init,
                                                sampling_step_fns))
