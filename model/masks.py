"""The one mask every padded batch needs."""

from __future__ import annotations

import torch
from torch import Tensor


def valid_mask(lengths: Tensor, width: int) -> Tensor:
    """[B, width] bool: True at the first ``lengths[b]`` positions of each row (the valid, unpadded ones)."""
    return torch.arange(width, device=lengths.device) < lengths[:, None]
