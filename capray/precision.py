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

import numpy as np
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


class EncoderStage:
    """The frozen encoder on its device, run one way for prepare's ``Encoder`` and caption's ``Captioner``.

    Same thread bound (the actor's CPU share, on GPU nodes too: tensor bookkeeping and copies use
    threads), same layout (channels-last on GPUs), same copy (uint8 pinned, then non-blocking: four
    times fewer bytes than float32), same precision (``autocast_dtype``), same output (``STORED``).
    Call it from the actor's model thread.
    """

    def __init__(self, encoder: torch.nn.Module, device: torch.device, *, threads: int):
        torch.set_num_threads(max(1, threads))
        self.device, self.dtype = device, autocast_dtype(device)
        self.encoder = encoder.to(device)
        if device.type == "cuda":  # channels-last convolutions: the tensor cores' fast path
            self.encoder.to(memory_format=torch.channels_last)

    @property
    def spec(self):
        return self.encoder.spec

    @torch.inference_mode()
    def __call__(self, pixels) -> torch.Tensor:
        """uint8 (B, H, W, 3) numpy → (B, P, E) ``STORED`` features on the device."""
        x = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.encoder(x).to(STORED)
