"""Token cross-entropy and IAR's cluster-oriented cross-entropy (arXiv 2501.00880, Eq. 4-5).

With a codebook rearranged so that cluster c owns ids [c·m, (c+1)·m), the probability of the
target's cluster is the sum of its members' probabilities; in log space that is a logsumexp over
each cluster's logits, so the cluster CE is a CE over V/m "cluster logits" with target id // m.
All in fp32.
"""
import jax
import jax.numpy as jnp


def token_ce(logits, targets, weights=None):
    """Mean CE over the full vocabulary. logits [..., V], targets [...] int."""
    logits = logits.astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return _mean(nll, weights)


def cluster_logits(logits, cluster_size: int):
    """[..., V] -> [..., V / m]: log of the total (unnormalised) probability mass of each cluster."""
    v = logits.shape[-1]
    if v % cluster_size:
        raise ValueError(f"vocab {v} is not divisible by cluster_size {cluster_size}; pick a divisor of the vocab")
    x = logits.astype(jnp.float32).reshape(*logits.shape[:-1], v // cluster_size, cluster_size)
    return jax.nn.logsumexp(x, axis=-1)


def cluster_ce(logits, targets, cluster_size: int, weights=None):
    """−log Σ_{i ∈ cluster(y)} softmax(logits)_i, averaged."""
    return token_ce(cluster_logits(logits, cluster_size), targets // cluster_size, weights)


def iar_loss(logits, targets, cluster_size: int, cluster_weight: float):
    """λ·L_cluster + L_token, with accuracies. Returns (loss, metrics)."""
    tok = token_ce(logits, targets)
    metrics = {
        "token_ce": tok,
        "token_acc": jnp.mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32)),
    }
    loss = tok
    if cluster_size > 1:
        cl_logits = cluster_logits(logits, cluster_size)
        cl = token_ce(cl_logits, targets // cluster_size)
        metrics["cluster_ce"] = cl
        metrics["cluster_acc"] = jnp.mean((jnp.argmax(cl_logits, -1) == targets // cluster_size).astype(jnp.float32))
        if cluster_weight:
            loss = loss + cluster_weight * cl
    metrics["loss"] = loss
    return loss, metrics


def _mean(x, weights):
    if weights is None:
        return jnp.mean(x)
    weights = weights.astype(jnp.float32)
    return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)
