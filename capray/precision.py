"""One precision policy for every stage, so that a caption does not depend on which job made it.

- **Encoder** (prepare and caption): half precision under autocast on GPUs that do it natively —
  bf16 from compute capability 8.0 (A100, H100, L4, ...), fp16 before that (T4, V100) —, fp32 on CPUs.
  ``torch.cuda.is_bf16_supported()`` is not the test: it also says yes where bf16 is emulated.
- **Features** are stored as fp16 by prepare. caption rounds the encoder's output to fp16 too, so its
  decoder sees the values that evaluate and training validation read back from the Parquet shards.
- **Decoder and beam search** run in fp32 everywhere (caption, evaluate, validation): a half-precision
  recurrent state drifts over 20 steps and can reorder the beams.
- **Training** runs the decoder under autocast on GPUs with the encoder's rule: bf16 needs no loss
  scaling; fp16 gets a GradScaler.
"""
from __future__ import annotations

import torch

STORED = torch.float16
"""The dtype of region features in prepare's Parquet shards."""


def half_dtype(capability: tuple[int, int]) -> torch.dtype:
    """The half-precision dtype a GPU of this compute capability runs natively."""
    return torch.bfloat16 if capability >= (8, 0) else torch.float16


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """What to run the encoder (and training's forward pass) in under autocast; None: fp32, no autocast."""
    if device.type != "cuda":
        return None
    return half_dtype(torch.cuda.get_device_capability(device))


def as_stored(features: torch.Tensor) -> torch.Tensor:
    """Region features as the decoder reads them from a prepared dataset: rounded to fp16, then fp32."""
    return features.to(STORED).float()
