"""capray.plots: the attention grid PNG."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from capray import storage
from capray.plots import attention_overlay, plot_attention

WORDS = ["a", "red", "square"]
GRID = 4  # the encoder's h = w


def _image(height: int = 96, width: int = 128) -> np.ndarray:
    """Grey diagonal stripes: something to see, and the same on average in every corner."""
    yy, xx = np.mgrid[:height, :width]
    grey = np.where((yy + xx) // 8 % 2 == 0, 100, 160).astype(np.uint8)
    return np.stack([grey] * 3, axis=-1)


def _attention(first: np.ndarray) -> np.ndarray:
    """(T, GRID, GRID) maps: ``first`` for the first word, fixed random maps for the others."""
    rest = np.random.default_rng(0).random((len(WORDS) - 1, GRID, GRID))
    rest /= rest.sum(axis=(1, 2), keepdims=True)  # each sums to 1 over the regions, as the model's do
    return np.concatenate([first[None], rest]).astype(np.float32)


def _corner(top: bool) -> np.ndarray:
    att = np.zeros((GRID, GRID))
    half = GRID // 2
    if top:
        att[:half, :half] = 1.0
    else:
        att[half:, half:] = 1.0
    return att / att.sum()


def _read_png(source) -> Image.Image:
    """The decoded RGB image; fails unless ``source`` holds a PNG."""
    with Image.open(source) as png:
        assert png.format == "PNG"
        return png.convert("RGB")


def _render(path, attention: np.ndarray) -> np.ndarray:
    plot_attention(_image(), WORDS, attention, str(path))
    return np.asarray(_read_png(path)).astype(np.float64)  # (H, W, 3)


def test_writes_a_non_blank_png(tmp_path):
    plot_attention(_image(), WORDS, _attention(_corner(top=True)), str(tmp_path / "att.png"), title="a red square")
    png = _read_png(tmp_path / "att.png")
    width, height = png.size
    assert width >= 3 * 150 and 150 <= height < width  # three panels side by side
    assert np.asarray(png).astype(float).var() > 0


def test_heat_map_sits_where_the_attention_is(tmp_path):
    top = _render(tmp_path / "top.png", _attention(_corner(top=True)))
    bottom = _render(tmp_path / "bottom.png", _attention(_corner(top=False)))
    uniform = _render(tmp_path / "uniform.png", _attention(np.full((GRID, GRID), 1 / GRID**2)))
    assert top.shape == bottom.shape == uniform.shape  # same words and image: same layout

    # Only the first word's panel (the second: the image comes first) differs between the two corner
    # renders, in its top-left and bottom-right quadrants, so the differing pixels span that panel's image.
    rows, cols = np.nonzero(np.abs(top - bottom).max(axis=-1) > 30)
    assert rows.size, "moving the attention did not change the plot"
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert top.shape[1] / 5 < c0 and c1 < top.shape[1] / 2, "the differing pixels should all lie in the second panel"
    dr, dc = (r1 - r0) // 6, (c1 - c0) // 6

    def redness_gap(render: np.ndarray) -> float:
        """How much redder (R - B) the panel's top-left corner is than its bottom-right corner."""
        red = render[..., 0] - render[..., 2]
        return red[r0:r0 + dr, c0:c0 + dc].mean() - red[r1 - dr:r1, c1 - dc:c1].mean()

    assert redness_gap(top) > redness_gap(uniform) + 40
    assert redness_gap(bottom) < redness_gap(uniform) - 40
    assert abs(redness_gap(uniform)) < 10  # the image alone makes no corner redder


def test_panels_wrap_after_five_per_row(tmp_path):
    def size(num_words: int) -> tuple[int, int]:
        att = np.random.default_rng(1).random((num_words, GRID, GRID))
        plot_attention(_image(), [f"w{i}" for i in range(num_words)], att, str(tmp_path / "p.png"))
        return _read_png(tmp_path / "p.png").size

    (w5, h5), (w6, h6) = size(4), size(5)  # the image and 4 words: one row; and 5 words: two
    assert w6 == w5 and h6 > 1.5 * h5


YELLOW, PURPLE = (255, 220, 0), (130, 40, 170)


def _coloured(height: int = 96, width: int = 128) -> np.ndarray:
    """A yellow left half and a purple right half: the colours the demo's shapes have."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:, : width // 2], image[:, width // 2:] = YELLOW, PURPLE
    return image


def test_the_first_panel_shows_the_image_in_its_own_colours(tmp_path):
    plot_attention(_coloured(), WORDS, _attention(_corner(top=True)), str(tmp_path / "att.png"))
    png = np.asarray(_read_png(tmp_path / "att.png")).astype(int)
    for colour in (YELLOW, PURPLE):
        rows, cols = np.nonzero(np.abs(png - colour).max(axis=-1) <= 3)
        # The image panel is drawn 2.4 in (240 px) wide: each half fills ~120 × 180 px of it, in panel 1 only.
        assert rows.size > 0.8 * 120 * 180, f"{colour} is not shown as it is"
        elsewhere = cols[cols > png.shape[1] / 4]
        assert (elsewhere > 0.9 * png.shape[1]).all(), f"{colour} shows in a word's panel"  # the colour bar may have it


def test_the_maps_lie_over_the_image_in_grey():
    image = _coloured()
    # Same brightness, other hues: the overlay must not tell them apart.
    grey = np.round(image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.uint8)
    att = _corner(top=True)
    for top in (att.max(), 2 * att.max()):
        np.testing.assert_allclose(attention_overlay(image, att, top=top).astype(int),
                                   attention_overlay(np.stack([grey] * 3, axis=-1), att, top=top).astype(int), atol=1)
    none = attention_overlay(image, np.zeros((GRID, GRID)), top=1.0)  # no attention: the image in grey, nothing else
    assert (none[..., 0] == none[..., 1]).all() and (none[..., 1] == none[..., 2]).all()
    np.testing.assert_allclose(none[..., 0].astype(int), grey.astype(int), atol=1)


def test_writes_into_a_new_nested_folder(tmp_path):
    out = tmp_path / "runs" / "epoch-3" / "attention" / "img-1.png"
    plot_attention(_image(), WORDS, _attention(_corner(top=True)), str(out))
    assert _read_png(out).size[0] > 0


def test_writes_to_s3(s3_bucket):
    uri = f"{s3_bucket}/plots/img-1.png"
    plot_attention(_image(), WORDS, _attention(_corner(top=True)), uri)
    assert _read_png(io.BytesIO(storage.read_bytes(uri))).size[0] > 0


@pytest.mark.parametrize("words, attention", [
    (["a", "dog"], np.ones((3, GRID, GRID))),      # fewer words than maps
    (["a", "dog", "runs"], np.ones((2, GRID, GRID))),  # more words than maps
    ([], np.ones((0, GRID, GRID))),                # nothing to plot
    (["a"], np.ones((1, GRID * GRID))),            # flat (T, P) weights, not reshaped to a grid
    (["a"], np.full((1, GRID, GRID), np.nan)),     # a broken model
])
def test_invalid_inputs_raise(tmp_path, words, attention):
    with pytest.raises(ValueError):
        plot_attention(_image(), words, attention, str(tmp_path / "att.png"))
    assert not (tmp_path / "att.png").exists()


def test_image_must_be_rgb_uint8(tmp_path):
    with pytest.raises(ValueError):
        plot_attention(_image().astype(np.float32), WORDS, _attention(_corner(top=True)), str(tmp_path / "a.png"))
