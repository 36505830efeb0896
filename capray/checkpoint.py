"""Checkpoint directories: weights as a state dict, the config and the vocabulary as JSON.

A checkpoint holds the encoder's weights too, so a cluster with no internet can caption with it.
Nothing is unpickled: ``model.pt`` is loaded with ``weights_only=True``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from capray import storage
from capray.encoders import EncoderError, EncoderSpec, RegionEncoder, build_encoder
from capray.errors import ConfigError, first_line
from capray.formats import CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE, VOCAB_FILE
from capray.model import Decoder, DecoderConfig
from capray.vocab import Vocabulary

CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train names the checkpoints of a run checkpoint_000000, ...
CHECKPOINT_FILES = (MODEL_FILE, CONFIG_FILE, VOCAB_FILE, TRAIN_STATE_FILE)
"""What every checkpoint holds (``optimizer.pt`` only those written by training)."""


class CheckpointError(ConfigError):
    """A checkpoint that is missing, unreadable or does not fit this version of capray."""


@dataclass
class LoadedModel:
    encoder: RegionEncoder
    decoder: Decoder
    vocab: Vocabulary
    config: dict
    """The checkpoint's config.json (encoder spec, decoder config, training config)."""
    train_state: dict
    uri: str
    """The checkpoint directory actually loaded (a run directory resolves to its best checkpoint)."""


def model_state(*, encoder_state: dict, decoder_state: dict) -> dict:
    """One flat state dict: ``encoder.*`` and ``decoder.*`` tensors."""
    state = {f"encoder.{k}": v.detach().cpu() for k, v in encoder_state.items()}
    state.update({f"decoder.{k}": v.detach().cpu() for k, v in decoder_state.items()})
    return state


def write_checkpoint(directory: str, *, state: dict, config: dict, vocab: Vocabulary, train_state: dict,
                     optimizer_state: dict | None = None) -> None:
    """Write a checkpoint directory (local path or URI)."""
    storage.write_bytes(storage.join(directory, MODEL_FILE), state_bytes(state))
    storage.write_json(storage.join(directory, CONFIG_FILE), config)
    vocab.save(storage.join(directory, VOCAB_FILE))
    storage.write_json(storage.join(directory, TRAIN_STATE_FILE), train_state)
    if optimizer_state is not None:
        storage.write_bytes(storage.join(directory, OPTIMIZER_FILE), state_bytes(optimizer_state))


def read_state(uri: str) -> dict:
    """A state dict written by ``write_checkpoint`` (tensors only, ``weights_only=True``)."""
    try:
        return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except storage.StorageError as exc:
        raise CheckpointError(str(exc)) from exc
    except Exception as exc:
        raise CheckpointError(f"{uri}: not a readable state dict ({type(exc).__name__})") from exc


def resolve_checkpoint(uri: str) -> str:
    """A checkpoint directory as is; a training run directory becomes its best checkpoint.

    Best = highest validation BLEU-4 recorded in ``train_state.json`` (later epochs win ties).
    """
    storage.check_bucket(uri)
    if storage.exists(storage.join(uri, MODEL_FILE)):
        return uri
    if not storage.is_dir(uri):
        raise CheckpointError(f"--checkpoint {uri}: no such checkpoint or run directory")
    candidates = []
    for directory in storage.list_dirs(uri):
        if storage.basename(directory).startswith(CHECKPOINT_PREFIX) and is_complete(directory):
            state = storage.read_json(storage.join(directory, TRAIN_STATE_FILE))
            candidates.append((state.get("val_bleu4", float("-inf")), state.get("epoch", -1), directory))
    if not candidates:
        raise CheckpointError(f"--checkpoint {uri}: has no {MODEL_FILE} and no {CHECKPOINT_PREFIX}* checkpoints")
    return max(candidates)[2]


def is_complete(directory: str) -> bool:
    """Whether a checkpoint directory holds all its files. A Train worker killed while uploading one (its
    whole group is stopped when any worker dies) leaves part of it; Ray never adopts that one, but its
    directory stays in the run."""
    return all(storage.exists(storage.join(directory, name)) for name in CHECKPOINT_FILES)


def load_checkpoint(uri: str, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load encoder + decoder + vocabulary from a checkpoint (or a run's best checkpoint)."""
    uri = resolve_checkpoint(uri)
    for name in (MODEL_FILE, CONFIG_FILE, VOCAB_FILE):
        if not storage.exists(storage.join(uri, name)):
            raise CheckpointError(f"--checkpoint {uri}: {name} is missing")
    config = storage.read_json(storage.join(uri, CONFIG_FILE))
    try:
        vocab = Vocabulary.load(storage.join(uri, VOCAB_FILE))
        spec = EncoderSpec(**config["encoder"])
        decoder_config = DecoderConfig(**config["decoder"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"--checkpoint {uri}: {CONFIG_FILE} does not fit this capray ({exc})") from exc
    if decoder_config.vocab_size != len(vocab):
        raise CheckpointError(f"--checkpoint {uri}: vocabulary has {len(vocab)} words, "
                              f"the decoder {decoder_config.vocab_size}")
    state = read_state(storage.join(uri, MODEL_FILE))
    try:
        encoder = build_encoder(spec, load_weights=False)
        decoder = Decoder(decoder_config)
        encoder.load_state_dict(_with_prefix(state, "encoder."))
        decoder.load_state_dict(decoder_state(state))
    except EncoderError as exc:
        raise CheckpointError(f"--checkpoint {uri}: {exc}") from exc
    except RuntimeError as exc:
        raise CheckpointError(f"--checkpoint {uri}: weights do not fit the config "
                              f"({first_line(exc)[:200]})") from exc
    train_state_uri = storage.join(uri, TRAIN_STATE_FILE)
    train_state = storage.read_json(train_state_uri) if storage.exists(train_state_uri) else {}
    encoder.to(device).eval()
    decoder.to(device).eval()
    return LoadedModel(encoder=encoder, decoder=decoder, vocab=vocab, config=config,
                       train_state=train_state, uri=uri)


def decoder_state(state: dict) -> dict:
    """The decoder's part of a ``model.pt`` state dict."""
    return _with_prefix(state, "decoder.")


def _with_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def state_bytes(state: dict) -> bytes:
    """``state`` as ``torch.save`` writes it, for ``storage.write_bytes``; ``read_state`` reads it back."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
