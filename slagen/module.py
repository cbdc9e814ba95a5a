"""``SparseLinearAttention``: the nn.Module form of SLA, owning the learnable projection ``proj_l``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from slagen.api import attention
from slagen.blockmap import BlockMap
from slagen.spec import parse_feature_map, parse_scope


class SparseLinearAttention(nn.Module):
    """SLA over (B, H, L, D) (or (B, L, H, D) with ``layout="blhd"``) query/key/value tensors.

    ``proj_l`` is ``nn.Linear(head_dim, head_dim)`` in float32, shared across heads and initialised to
    zero, so an un-tuned module computes pure sparse attention. Its state dict (``proj_l.weight``,
    ``proj_l.bias``) matches thu-ml/SLA's ``SparseLinearAttention``, whose checkpoints load directly.
    With ``feature_map=None`` (sparse-only) the module has no parameters.
    """

    def __init__(self, head_dim: int, topk: float = 0.05, negligible: float = 0.0,
                 feature_map: Optional[str] = "softmax", scope: str = "marginal", block_q: int = 64,
                 block_k: int = 64, layout: str = "bhld", backend: str = "auto", scale: Optional[float] = None):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim={head_dim!r} must be a positive integer")
        self.head_dim, self.topk, self.negligible = head_dim, topk, negligible
        self.feature_map, self.scope = parse_feature_map(feature_map), parse_scope(scope)
        self.block_q, self.block_k, self.layout, self.backend, self.scale = block_q, block_k, layout, backend, scale
        self.proj_l = None
        if self.feature_map is not None:
            self.proj_l = nn.Linear(head_dim, head_dim, dtype=torch.float32)
            nn.init.zeros_(self.proj_l.weight)
            nn.init.zeros_(self.proj_l.bias)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, block_map: Optional[BlockMap] = None) -> Tensor:
        proj = self.proj_l
        return attention(q, k, v, topk=self.topk, negligible=self.negligible, feature_map=self.feature_map,
                         scope=self.scope, block_q=self.block_q, block_k=self.block_k, scale=self.scale,
                         proj_weight=proj.weight if proj is not None else None,
                         proj_bias=proj.bias if proj is not None else None,
                         layout=self.layout, block_map=block_map, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, topk={self.topk}, negligible={self.negligible}, "
                f"feature_map={self.feature_map!r}, scope={self.scope!r}, block={self.block_q}x{self.block_k}, "
                f"layout={self.layout!r}, backend={self.backend!r}")
