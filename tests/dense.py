"""An independent dense float64 formula of SLA (SLA.md), built from full Lq×Lk masks.

It shares nothing with slagen.reference but the class mask it is given, so it checks the reference's
blocking, gathering, pre-aggregation and padding logic.
"""

import torch


def expand_mask(mask, lq, lk, block_q, block_k):
    """(B, H, T_m, T_n) block classes -> (B, H, Lq, Lk) per-element classes."""
    rows = torch.arange(lq) // block_q
    cols = torch.arange(lk) // block_k
    return mask[:, :, rows][:, :, :, cols]


def block_means(x, block):
    """(B, H, ceil(L / block), D) float64: the mean of each block of ``block`` rows of x (B, H, L, D), a partial
    last block divided by its true row count."""
    n = x.shape[2]
    pad = torch.nn.functional.pad(x.double(), (0, 0, 0, -n % block))
    rows = torch.full((pad.shape[2] // block, 1), float(block), dtype=torch.float64, device=x.device)
    rows[-1] = n - (rows.shape[0] - 1) * block
    return pad.view(*x.shape[:2], -1, block, x.shape[-1]).sum(-2) / rows


def phi(x, name):
    if name == "softmax":
        return torch.softmax(x, -1)
    if name == "elu":
        return torch.nn.functional.elu(x) + 1
    return torch.relu(x)


def dense_sla(q, k, v, mask, *, block_q, block_k, scale, feature_map, scope, weight=None, bias=None, eps=1e-5):
    """O = softmax(scale·QKᵀ on critical entries)·V + Proj(linear attention on the scope entries)."""
    q, k, v = q.double(), k.double(), v.double()
    m = expand_mask(mask, q.shape[-2], k.shape[-2], block_q, block_k)
    crit = m == 1
    s = (scale * q @ k.transpose(-1, -2)).masked_fill(~crit, float("-inf"))
    o = torch.softmax(s, -1).nan_to_num(0.0) @ v           # a row with no critical entry gives 0
    if feature_map is None:
        return o
    a = (m == 0) if scope == "marginal" else torch.ones_like(crit)
    w = (phi(q, feature_map) @ phi(k, feature_map).transpose(-1, -2)) * a
    o_l = (w @ v) / (w.sum(-1, keepdim=True) + eps)
    if weight is not None:
        o_l = o_l @ weight.double().t()
    if bias is not None:
        o_l = o_l + bias.double()
    return o + o_l
