"""Per-token entropy of a categorical distribution given by logits.

H_t = -sum_j p_tj log p_tj (nats), the quantity "Beyond the 80/20 Rule" (arXiv 2506.01939) ranks tokens by.
Pure torch: nothing here imports TRL or the rest of the package.
"""

from __future__ import annotations

import torch

# Rows per chunk are chosen so that one float32 chunk of logits takes about this many bytes.
_CHUNK_BYTES = 64 * 2**20
# nats: "over half of the tokens have entropy below 0.01" in Qwen3-8B (the paper); the entropy-pattern metrics use it
LOW_ENTROPY = 0.01


@torch.no_grad()
def token_entropy(logits: torch.Tensor, chunk_size: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dimension, in float32, without gradient.

    Args:
        logits: `(..., V)` tensor of any floating dtype. Entries of `-inf` (masked vocabulary) are allowed.
        chunk_size: rows (positions) converted to float32 at a time. `None` picks a size that keeps each float32
            chunk near 64 MiB, so no full float32 copy of a `(N, V)` bf16 tensor is ever made.
        temperature: the sampling temperature; the entropy is that of the distribution tokens were sampled from.

    Returns:
        `(...)` float32 tensor of entropies in nats, on the device of `logits`. A row whose logits are all `-inf`
        or contain NaN gives NaN (callers exclude such positions; see `forking_trl.selection`).
    """
    if logits.dim() == 0:
        raise ValueError("token_entropy: `logits` must have a vocabulary dimension, got a scalar.")
    if temperature <= 0:
        raise ValueError(f"token_entropy: `temperature` must be > 0, got {temperature}.")
    vocab = logits.size(-1)
    flat = logits.reshape(-1, vocab)  # (N, V), a view when possible
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_BYTES // (4 * max(vocab, 1)))
    if chunk_size < 1:
        raise ValueError(f"token_entropy: `chunk_size` must be >= 1, got {chunk_size}.")

    out = torch.empty(flat.size(0), dtype=torch.float32, device=logits.device)
    for start in range(0, flat.size(0), chunk_size):
        # (n, V) copy 1 of 2; never in place on input
        x = flat[start : start + chunk_size].to(torch.float32, copy=True)
        if temperature != 1.0:
            x.div_(temperature)
        x.sub_(x.amax(dim=-1, keepdim=True))  # shifted, max 0: exp cannot overflow
        p = x.exp()  # (n, V) copy 2: unnormalised probabilities
        sum_exp = p.sum(dim=-1)  # (n,)
        x.clamp_(min=torch.finfo(torch.float32).min)  # -inf (masked vocabulary) -> finite, so 0 * x = 0, not NaN
        # H = log Z - E_p[shifted]
        out[start : start + chunk_size] = sum_exp.log() - p.mul_(x).sum(dim=-1) / sum_exp
    return out.view(logits.shape[:-1])
