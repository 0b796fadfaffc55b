"""Exact k-th smallest absolute value over a whole model, streaming: a radix selection on the
floats' bit patterns (for non-negative IEEE floats, bit order is value order), 16 bits per pass.
Memory is one 65,536-bin histogram per row, whatever the model size."""

from __future__ import annotations

from collections.abc import Callable

import torch

from foldin.methods.base import StepContext, TensorSlot

_DIGIT = 16
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64}


def kth_smallest_abs(ctx: StepContext, rows: list[Callable[[TensorSlot], torch.Tensor]], ks: list[int]) -> list[float]:
    """For each row (a whole-model vector given tensor by tensor by a getter), its k-th smallest
    absolute value, 1-based as torch.kthvalue counts. One pass per 16 bits of the float type."""
    dtype = ctx.compute_dtype
    width = torch.finfo(dtype).bits
    prefixes = [0] * len(rows)
    remaining = list(ks)
    for shift in range(width - _DIGIT, -1, -_DIGIT):

        def histograms(slot: TensorSlot, shift: int = shift) -> list[torch.Tensor]:
            out = []
            for i, row in enumerate(rows):
                bits = row(slot).abs().reshape(-1).view(_INT_VIEW[dtype])
                if shift + _DIGIT < width:  # keep only values whose higher digits match the prefix
                    bits = bits[(bits >> (shift + _DIGIT)) == prefixes[i]]
                digit = ((bits >> shift) & (2**_DIGIT - 1)).long()
                out.append(torch.bincount(digit, minlength=2**_DIGIT))
            return out

        totals = [sum(parts) for parts in zip(*ctx.scan(histograms, f"threshold pass {(width - shift) // _DIGIT}"))]
        for i in range(len(rows)):
            cumulative = totals[i].cumsum(0)
            digit = int(torch.searchsorted(cumulative, remaining[i]).item())
            remaining[i] -= int(cumulative[digit - 1]) if digit else 0
            prefixes[i] = (prefixes[i] << _DIGIT) | digit
    int_dtype = _INT_VIEW[dtype]
    return [torch.tensor(p, dtype=int_dtype).view(dtype).item() for p in prefixes]
