"""BlockMap: the classified block mask plus the lookup tables the kernels walk.

Shapes (T_m = ceil(Lq / block_q), T_n = ceil(Lk / block_k)), all int32 except ``mask``:
  mask            int8  (B, H, T_m, T_n)   1 critical, 0 marginal, -1 negligible
  crit_lut        (B, H, T_m, W_c)  per query block, its critical key blocks ascending
  crit_count      (B, H, T_m)
  crit_col_lut    (B, H, T_n, T_m)  per key block, the query blocks that chose it as critical, ascending
  crit_col_count  (B, H, T_n)
  negl_lut, negl_count, negl_col_lut, negl_col_count: the same for the negligible class (W_n may be 0;
                  without a negligible class negl_col_lut is (B, H, T_n, 0): no T_n × T_m table of -1s)
Slots past a row's count hold -1 and are never read by a kernel.
The column tables (crit_col_*, negl_col_*) serve only the backward: ``attention`` builds a map without them
(:func:`no_columns`: zero-size stand-ins, ``has_columns`` False) for a call that will not be differentiated.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import torch

LUT_FIELDS = ("mask", "crit_lut", "crit_count", "crit_col_lut", "crit_col_count",
              "negl_lut", "negl_count", "negl_col_lut", "negl_col_count")


def class_lists(mask: torch.Tensor, value: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ascending indices of the blocks of class ``value`` along the last dim of ``mask``.

    Returns (lut (..., width) int32 with -1 past the count, count (...) int32).
    """
    n = mask.shape[-1]
    hit = mask == value
    key = (~hit).to(torch.int32) * n + torch.arange(n, device=mask.device, dtype=torch.int32)
    lut = torch.sort(key, dim=-1).values[..., :width]
    lut = torch.where(lut < n, lut, torch.full_like(lut, -1))
    return lut.contiguous(), hit.sum(-1, dtype=torch.int32)


def no_columns(mask: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Zero-size stand-ins (crit_col_lut, crit_col_count, negl_col_lut, negl_col_count) for a map that will not
    reach a backward: (B, H, 0, 0) and (B, H, 0) int32."""
    lead = mask.shape[:-2]
    lut, count = mask.new_empty((*lead, 0, 0), dtype=torch.int32), mask.new_empty((*lead, 0), dtype=torch.int32)
    return lut, count, lut, count


def lists_from_mask(mask: torch.Tensor, crit_width: int, negl_width: int,
                    columns: bool = True) -> Tuple[torch.Tensor, ...]:
    """All lookup tables of a class mask, in the order of ``LUT_FIELDS`` (without ``columns``: the column
    tables are :func:`no_columns` stand-ins)."""
    crit_lut, crit_count = class_lists(mask, 1, crit_width)
    negl_lut, negl_count = class_lists(mask, -1, negl_width)
    if columns:
        cols = mask.transpose(-1, -2)
        crit_col_lut, crit_col_count = class_lists(cols, 1, mask.shape[-2])
        negl_col_lut, negl_col_count = class_lists(cols, -1, mask.shape[-2] if negl_width else 0)
    else:
        crit_col_lut, crit_col_count, negl_col_lut, negl_col_count = no_columns(mask)
    return (mask, crit_lut, crit_count, crit_col_lut, crit_col_count,
            negl_lut, negl_count, negl_col_lut, negl_col_count)


def has_columns(maps) -> bool:
    """Whether the BlockMap tensors ``maps`` (in ``LUT_FIELDS`` order) carry their column tables (one count per
    key block), as a backward needs."""
    return maps[4].shape[-1] == maps[0].shape[-1]


@dataclasses.dataclass(frozen=True)
class BlockMap:
    """The block classification of one (q, k) pair and its lookup tables (see the module docstring)."""

    mask: torch.Tensor
    crit_lut: torch.Tensor
    crit_count: torch.Tensor
    crit_col_lut: torch.Tensor
    crit_col_count: torch.Tensor
    negl_lut: torch.Tensor
    negl_count: torch.Tensor
    negl_col_lut: torch.Tensor
    negl_col_count: torch.Tensor
    block_q: int
    block_k: int

    @classmethod
    def from_mask(cls, mask: torch.Tensor, *, block_q: int, block_k: int) -> "BlockMap":
        """Build the lookup tables of a given int8 class mask (B, H, T_m, T_n) of values in {-1, 0, 1}."""
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise ValueError("mask must be a 4-D tensor (B, H, T_m, T_n) of int8 values -1, 0, 1")
        mask = mask.to(torch.int8)
        if mask.numel() and not bool(((mask >= -1) & (mask <= 1)).all()):
            raise ValueError("mask values must be 1 (critical), 0 (marginal) or -1 (negligible)")
        crit_w = max(int((mask == 1).sum(-1).max()), 1) if mask.numel() else 1
        negl_w = int((mask == -1).sum(-1).max()) if mask.numel() else 0
        return cls(*lists_from_mask(mask, crit_w, negl_w), block_q=block_q, block_k=block_k)

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        """The tensors in the order of ``LUT_FIELDS`` (the order the custom ops take them)."""
        return tuple(getattr(self, f) for f in LUT_FIELDS)

    @property
    def has_columns(self) -> bool:
        """Whether the column tables are here (False only for the map of a call that is not differentiated)."""
        return has_columns(self.tensors())

    @property
    def has_negligible(self) -> bool:
        return self.negl_lut.shape[-1] > 0

    @property
    def density(self) -> float:
        """Fraction of (query block, key block) pairs that are critical."""
        return float((self.mask == 1).float().mean()) if self.mask.numel() else 0.0

    def __repr__(self) -> str:
        B, H, tm, tn = self.mask.shape
        return (f"BlockMap(B={B}, H={H}, T_m={tm}, T_n={tn}, block={self.block_q}x{self.block_k}, "
                f"critical per row={self.crit_lut.shape[-1]}, negligible per row={self.negl_lut.shape[-1]})")
