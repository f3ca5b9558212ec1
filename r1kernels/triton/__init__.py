"""Triton kernels and their launchers, one module per kernel family (``norm``, ``rope``, ``activation``,
``quant``, ``moe``, ``mla``; MoE routing and token alignment sit in ``moe_route`` apart from the expert
GEMMs, and the MLA decode and cache append in ``mla_decode`` apart from the prefill attention, to keep each
file readable).

Each module holds ``@triton.jit`` kernels and plain-Python launchers that check their arguments, allocate
the outputs, compute the grid and launch. Autograd and dispatch live one layer up, in ``r1kernels.ops``,
which imports these modules lazily (so ``import r1kernels`` never imports triton).

This file imports torch only; the helpers below are shared by the launchers.
"""
from __future__ import annotations

import torch


def tile_budget(device: torch.device) -> int:
    """How many elements one program's tile may hold.

    On a GPU a tile of 4096 elements keeps registers in check for the element-wise / row-wise kernels here.
    Under the interpreter (CPU) each program costs a Python-level pass over numpy arrays, so bigger tiles
    (fewer programs) are much faster and cost nothing.
    """
    return 4096 if device.type == "cuda" else 65536


def num_warps_for(tile_elems: int) -> int:
    """Warps per program for a tile of ``tile_elems`` elements (about 16 elements per thread, 4 to 32 warps)."""
    warps = 4
    while warps < 32 and warps * 32 * 16 < tile_elems:
        warps *= 2
    return warps


def persistent_programs(device: torch.device) -> int:
    """Program count for kernels that loop over rows (one partial result per program): a wave of the GPU's
    SMs; a few programs under the interpreter. Read from cached device properties: no host sync."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, last dim]``: a view (any row and column strides kept) whenever the leading dims can be
    merged, else a copy. ``t`` must have at least one dim and at least one element."""
    return t.reshape(-1, t.shape[-1])
