"""capray.precision: one policy for the encoder, the stored features, the decoder and training."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from capray.loop import amp_settings
from capray.precision import STORED, as_stored, autocast_dtype


def test_cpus_run_everything_in_fp32():
    assert autocast_dtype(torch.device("cpu")) is None
    assert amp_settings(torch.device("cpu")) == (False, torch.float32)


def test_features_reach_the_decoder_as_prepare_stores_them():
    features = torch.randn(2, 4, 8) * 300  # some values past fp16's fine steps
    stored = torch.from_numpy(features.numpy().astype(np.float16))  # prepare's Parquet column
    got = as_stored(features)
    assert STORED == torch.float16 and got.dtype == torch.float32
    assert torch.equal(got, stored.float()) and not torch.equal(got, features)


def test_the_encoder_stage_prepare_and_caption_share_gives_stored_features():
    from capray.encoders import EncoderSpec, build_encoder
    from capray.precision import EncoderStage

    saved = torch.get_num_threads()
    try:
        encoder = build_encoder(EncoderSpec("resnet18", "none", 64))
        stage = EncoderStage(encoder, torch.device("cpu"), threads=1)
        assert torch.get_num_threads() == 1  # the actor's CPU share, not the node's cores
        pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
        features = stage(pixels)
        with torch.no_grad():
            expected = encoder(torch.from_numpy(pixels)).to(torch.float16)
        assert features.dtype == STORED and features.shape == (3, 4, 512) and stage.spec.name == "resnet18"
        assert torch.equal(features, expected)
    finally:
        torch.set_num_threads(saved)
