"""FP8 as DeepSeek-V4.1 stores Engram weights: E4M3 values with E8M0 (power-of-two) scales, one
scale per ``BLOCK`` values of a row (``*_rows``) or per ``BLOCK`` x ``BLOCK`` block
(``*_blocks``).

A scale is the smallest power of two with ``amax / scale <= 448`` (E4M3's largest value), so
values never saturate. Round-trip error: at most ``2**-4 * |x|`` (three mantissa bits, rounding to
nearest) plus ``2**-10 * scale`` where values fall into E4M3's subnormal range
(``error_bound``).
"""

from __future__ import annotations

import torch

BLOCK = 32
E4M3_MAX = 448.0


def _scale(amax: torch.Tensor) -> torch.Tensor:
    exponent = torch.ceil(torch.log2(amax.clamp_min(2.0**-126) / E4M3_MAX)).clamp(-127, 127)
    return torch.exp2(exponent)


def _pad(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    r, c = x.shape
    return torch.nn.functional.pad(x, (0, -c % cols, 0, -r % rows))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [R, C]`` -> (E4M3 ``[R, C]``, E8M0 scales ``[R, ceil(C/32)]``)."""
    rows, cols = x.shape
    groups = _pad(x.float(), 1, BLOCK).unflatten(1, (-1, BLOCK))  # [R, C/32, 32]
    scale = _scale(groups.abs().amax(dim=-1))
    q = (groups / scale.unsqueeze(-1)).flatten(1)[:, :cols].to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    cols = q.shape[1]
    per_value = scale.float().repeat_interleave(BLOCK, dim=1)[:, :cols]
    return q.float() * per_value


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [R, C]`` -> (E4M3 ``[R, C]``, E8M0 scales ``[ceil(R/32), ceil(C/32)]``)."""
    rows, cols = x.shape
    padded = _pad(x.float(), BLOCK, BLOCK)
    blocks = padded.unflatten(0, (-1, BLOCK)).unflatten(2, (-1, BLOCK))  # [R/32, 32, C/32, 32]
    scale = _scale(blocks.abs().amax(dim=(1, 3)))
    q = (blocks / scale[:, None, :, None]).flatten(2).flatten(0, 1)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    s = scale.float().repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)
    return q.float() * s[:rows, :cols]


def error_bound(x: torch.Tensor, scale_per_value: torch.Tensor) -> torch.Tensor:
    """Largest round-trip error allowed for each value of ``x``."""
    return 2.0**-4 * x.abs() + 2.0**-10 * scale_per_value
