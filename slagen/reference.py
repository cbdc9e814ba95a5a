"""The PyTorch reference of SLA (../shared/SLA.md), written to be read rather than to be fast.

Every function takes one logical layout, (B, H, L, D) with any strides, works on any device, and
computes in float32 (float64 when the inputs are float64). It is differentiable through autograd and is
the oracle every kernel is tested against. The block map is driven only by the int8 class mask
(1 critical, 0 marginal, -1 negligible), which is the contract between selection and attention.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from slagen.blockmap import class_lists

EPS = 1e-5  # the linear branch's denominator epsilon (SLA.md §3)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_blocks(length: int, block: int) -> int:
    return (length + block - 1) // block


def block_counts(n_blocks: int, topk: float, negligible: float) -> Tuple[int, int]:
    """(n_crit, n_negl) for a row of ``n_blocks`` key blocks (SLA.md §1.3).

    n_crit = clamp(floor(topk * T_n), 1, T_n); n_negl = min(floor(negligible * T_n), T_n - n_crit).
    The floor forgives a relative 1e-9 of float error so that e.g. 0.29 * 100 gives 29, not 28.
    """
    def floor(x: float) -> int:
        return int(math.floor(x * (1 + 1e-9)))

    n_crit = min(max(floor(topk * n_blocks), 1), n_blocks)
    n_negl = min(floor(negligible * n_blocks), n_blocks - n_crit)
    return n_crit, n_negl


def pad_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    """Zero-pad dim -2 of (B, H, L, D) up to a multiple of ``block``."""
    extra = num_blocks(x.shape[-2], block) * block - x.shape[-2]
    return F.pad(x, (0, 0, 0, extra)) if extra else x


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of the rows of each block: (B, H, L, D) -> (B, H, ceil(L/block), D).

    A partial last block is divided by its true row count.
    """
    length = x.shape[-2]
    sums = pad_rows(x, block).unflatten(-2, (-1, block)).sum(-2)
    rows = torch.clamp(length - block * torch.arange(sums.shape[-2], device=x.device), max=block)
    return sums / rows.to(sums.dtype)[:, None]


def block_scores(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Pooled scores S̄ = pool(Q) · pool(K - mean(K))^T, (B, H, T_m, T_n), in the compute dtype.

    Each score is an elementwise product summed over D, the same reduction for every (i, j) — not a matmul,
    whose kernels may round tail columns differently (a CPU BLAS did), so equal key blocks score exactly equal
    and ties resolve as classify says. Query blocks go in chunks of at most 2^26 products."""
    ct = compute_dtype(q.dtype)
    q, k = q.to(ct), k.to(ct)
    k_smooth = k - k.mean(dim=-2, keepdim=True)
    qp, kp = pool_blocks(q, block_q), pool_blocks(k_smooth, block_k)
    rows = max(1, (1 << 26) // max(1, qp.shape[0] * qp.shape[1] * kp.shape[-2] * kp.shape[-1]))
    return torch.cat([(qp[..., i:i + rows, None, :] * kp[..., None, :, :]).sum(-1)
                      for i in range(0, max(qp.shape[-2], 1), rows)], dim=-2)   # ≥ 1 chunk, even for T_m = 0


def classify(scores: torch.Tensor, n_crit: int, n_negl: int) -> torch.Tensor:
    """int8 class mask from scores: 1 for the n_crit best, -1 for the n_negl worst, 0 otherwise.

    The order is score descending, then key-block index ascending (a stable sort), so ties are
    deterministic: critical = first n_crit, negligible = last n_negl of that order.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    n = scores.shape[-1]
    rank_class = torch.zeros(n, dtype=torch.int8, device=scores.device)
    rank_class[:n_crit] = 1
    if n_negl:
        rank_class[n - n_negl:] = -1
    mask = torch.empty_like(order, dtype=torch.int8)
    mask.scatter_(-1, order, rank_class.expand_as(order).contiguous())
    return mask


def block_mask(q: torch.Tensor, k: torch.Tensor, *, topk: float, negligible: float,
               block_q: int, block_k: int) -> torch.Tensor:
    """The SLA block map of SLA.md §1 as an int8 mask (B, H, T_m, T_n)."""
    with torch.no_grad():
        scores = block_scores(q, k, block_q, block_k)
        n_crit, n_negl = block_counts(scores.shape[-1], topk, negligible)
        return classify(scores, n_crit, n_negl)


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """φ applied row-wise: softmax over D, elu(x) + 1, or relu."""
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    if name == "elu":
        return F.elu(x) + 1
    if name == "relu":
        return torch.relu(x)
    raise ValueError(f"feature_map={name!r} is not supported; allowed: softmax, elu, relu")


def sparse_branch(q, k, v, mask, *, block_q, block_k, scale, chunk=64):
    """O^s and its natural-log LSE (SLA.md §2) on (B, H, L, D) inputs in the compute dtype.

    Rows of a query block with no critical key block get O^s = 0 and LSE = -inf.
    Returns (o_s (B, H, Lq, D), lse (B, H, Lq)).
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[-2]
    Tm, Tn = mask.shape[-2:]
    qb = pad_rows(q, block_q).unflatten(-2, (Tm, block_q)).flatten(0, 1)      # (BH, Tm, bq, D)
    kb = pad_rows(k, block_k).unflatten(-2, (Tn, block_k)).flatten(0, 1)      # (BH, Tn, bk, D)
    vb = pad_rows(v, block_k).unflatten(-2, (Tn, block_k)).flatten(0, 1)
    key_ok = (torch.arange(Tn * block_k, device=q.device) < Lk).view(Tn, block_k)
    width = max(int((mask == 1).sum(-1).max()) if mask.numel() else 0, 1)
    lut = class_lists(mask, 1, width)[0].flatten(0, 1).long()                 # (BH, Tm, W), -1 past the count
    slot_ok, lut = lut >= 0, lut.clamp_min(0)
    bh = torch.arange(lut.shape[0], device=q.device)[:, None, None]
    outs, lses = [], []
    for i0 in range(0, Tm, chunk):
        idx, ok = lut[:, i0:i0 + chunk], slot_ok[:, i0:i0 + chunk]
        kg = kb[bh, idx].flatten(2, 3)                                          # (BH, c, W*bk, D)
        vg = vb[bh, idx].flatten(2, 3)
        valid = (ok[..., None] & key_ok[idx]).flatten(2, 3)[:, :, None, :]    # (BH, c, 1, W*bk)
        s = (scale * qb[:, i0:i0 + chunk] @ kg.transpose(-1, -2)).masked_fill(~valid, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        l_safe = torch.where(l > 0, l, torch.ones_like(l))
        outs.append((p @ vg) / l_safe)
        lses.append((m + torch.log(l)).squeeze(-1))
    o = torch.cat(outs, 1).unflatten(0, (B, H)).flatten(2, 3)[:, :, :Lq]
    lse = torch.cat(lses, 1).unflatten(0, (B, H)).flatten(2, 3)[:, :, :Lq]
    return o, lse


def linear_branch(q, k, v, mask, *, block_q, block_k, feature, scope, eps=EPS):
    """O^l and its denominator (SLA.md §3) on (B, H, L, D) inputs in the compute dtype.

    Returns (o_l (B, H, Lq, D), den (B, H, Lq)) with den = φ(Q_i) Z_i + eps.
    """
    Lq, Lk = q.shape[-2], k.shape[-2]
    Tm, Tn = mask.shape[-2:]
    phi_k = pad_rows(feature_map(k, feature), block_k).unflatten(-2, (Tn, block_k))   # pads are zero
    vb = pad_rows(v, block_k).unflatten(-2, (Tn, block_k))
    h = phi_k.transpose(-1, -2) @ vb                                   # (B, H, Tn, D, D)
    z = phi_k.sum(-2)                                                  # (B, H, Tn, D)
    if scope == "marginal":
        a = (mask == 0).to(q.dtype)                                    # (B, H, Tm, Tn)
    else:
        a = torch.ones(mask.shape, dtype=q.dtype, device=q.device)
    h_i = torch.einsum("bhmn,bhnde->bhmde", a, h)
    z_i = torch.einsum("bhmn,bhnd->bhmd", a, z)
    phi_q = pad_rows(feature_map(q, feature), block_q).unflatten(-2, (Tm, block_q))
    num = phi_q @ h_i                                                  # (B, H, Tm, bq, D)
    den = (phi_q * z_i[..., None, :]).sum(-1) + eps                    # (B, H, Tm, bq)
    return (num / den[..., None]).flatten(2, 3)[:, :, :Lq], den.flatten(2, 3)[:, :, :Lq]


def attention_parts(q, k, v, mask, *, block_q: int, block_k: int, scale: float,
                    feature_map: Optional[str] = "softmax", scope: str = "marginal",
                    proj_weight: Optional[torch.Tensor] = None, proj_bias: Optional[torch.Tensor] = None,
                    eps: float = EPS):
    """SLA output and the intermediates a kernel backward may keep, all in the compute dtype.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); mask: int8 (B, H, T_m, T_n). Proj is x W^T + b with the
    given weight/bias (no weight: identity, no bias: zero). With feature_map=None there is no linear
    branch. Returns (o, lse, o_l, den): o = O^s + Proj(O^l) (B, H, Lq, D); lse (B, H, Lq) the sparse
    branch's natural-log LSE; o_l = O^l before Proj and den its denominator (None when sparse-only).
    """
    ct = compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    o, lse = sparse_branch(qc, kc, vc, mask, block_q=block_q, block_k=block_k, scale=scale)
    o_l = den = None
    if feature_map is not None:
        o_l, den = linear_branch(qc, kc, vc, mask, block_q=block_q, block_k=block_k, feature=feature_map,
                                 scope=scope, eps=eps)
        proj = o_l
        if proj_weight is not None:
            proj = proj @ proj_weight.to(ct).t()
        if proj_bias is not None:
            proj = proj + proj_bias.to(ct)
        o = o + proj
    return o, lse, o_l, den


def attention(q, k, v, mask, **kwargs) -> torch.Tensor:
    """SLA output O = O^s + Proj(O^l) in q's dtype (arguments as in :func:`attention_parts`)."""
    return attention_parts(q, k, v, mask, **kwargs)[0].to(q.dtype)
