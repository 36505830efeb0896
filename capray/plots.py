"""Plots: where the decoder looked for each word (the TF tutorial's ``plot_attention``), a run's curves, both for a run.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, never pyplot, so plotting
touches no global state and works in Ray workers without a display.
"""
from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from capray import storage

PANELS_PER_ROW = 5
PANEL_INCHES = 2.4
DPI = 100
HEATMAP_CMAP = "jet"
HEATMAP_ALPHA = 0.65
"""Opacity of a map where attention is at the plot's top; it fades linearly to nothing at 0."""
LUMA = np.array([0.299, 0.587, 0.114])
"""ITU-R 601 weights: the grey an RGB pixel is shown as under a map."""
CURVES_FILE = "curves.png"
"""``RUN/curves.png``: a training run's loss and val BLEU-4 per epoch."""
ATTENTION_DIR = "attention"
"""``RUN/attention/``: attention maps of a few fixed val images, drawn after training."""


def plot_attention(image: np.ndarray, words: list[str], attention: np.ndarray, out: str, *,
                   title: str | None = None) -> None:
    """Write one PNG to ``out``: the image as it is, then a panel per word, with a colour bar.

    A word's panel is the image in grey under that word's attention map: a coloured map over the
    coloured image mixes the two (a yellow square under a blue map reads green), so the colours are
    read from the first panel and where the decoder looked from the others. The map is opaque where
    attention is high and fades to nothing where it is 0, so the shapes stay visible. All maps share
    one scale, 0 to the largest weight of any word (the colour bar, in attention weight per region):
    a word that looked everywhere shows faint, one that looked at one region bright.

    ``image`` is (H, W, 3) uint8; ``attention`` is (T, h, w), one map over the encoder's h x w grid per
    word (reshape the model's (T, P) weights first), upsampled bilinearly to the image size.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    image, attention = _check(image, words, attention)
    height, width = image.shape[:2]
    top = float(attention.max()) or 1.0
    panels = [("image", image)] + [(w, attention_overlay(image, att, top=top)) for w, att in zip(words, attention)]
    num_cols = min(len(panels), PANELS_PER_ROW)
    num_rows = math.ceil(len(panels) / PANELS_PER_ROW)
    panel_height = PANEL_INCHES * height / width
    fig = Figure(figsize=(num_cols * PANEL_INCHES + 0.9, num_rows * (panel_height + 0.35) + (0.4 if title else 0)),
                 dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = []
    for i, (word, pixels) in enumerate(panels):
        ax = fig.add_subplot(num_rows, num_cols, i + 1)
        ax.imshow(pixels)
        ax.set_title(word, fontsize=11, parse_math=False,  # a "$" in a word must not start mathtext
                     style="italic" if i == 0 else "normal")
        ax.axis("off")
        axes.append(ax)
    colour_bar = fig.colorbar(ScalarMappable(Normalize(0.0, top), cmap=HEATMAP_CMAP), ax=axes, shrink=0.8,
                              aspect=30)
    colour_bar.set_label("attention weight per region", fontsize=9)
    if title:
        fig.suptitle(title, parse_math=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(out, buf.getvalue())


def attention_overlay(image: np.ndarray, att: np.ndarray, *, top: float) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` in grey with the (h, w) map ``att`` over it, coloured on a 0..``top`` scale.

    Each pixel is grey·(1 − a) + colour·a with a = ``HEATMAP_ALPHA`` · attention / ``top``: the image's hue
    never enters, only its brightness.
    """
    from matplotlib import colormaps

    height, width = image.shape[:2]
    grey = (image.astype(np.float32) @ LUMA.astype(np.float32))[..., None] / 255.0  # (H, W, 1)
    level = np.clip(_upsample(np.asarray(att, dtype=np.float32), height, width) / top, 0.0, 1.0)  # (H, W)
    colour = colormaps[HEATMAP_CMAP](level)[..., :3]  # (H, W, 3)
    alpha = HEATMAP_ALPHA * level[..., None]
    return np.round((grey * (1.0 - alpha) + colour * alpha) * 255.0).astype(np.uint8)


def plot_curves(epochs: list[dict], out: str) -> None:
    """Write a PNG of a run's train/val loss and val BLEU-4 per epoch (``metrics.jsonl`` lines)."""
    if not epochs:
        raise ValueError("no epochs to plot")
    x = [e["epoch"] + 1 for e in epochs]
    fig = Figure(figsize=(10, 3.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    loss, bleu = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    loss.plot(x, [e["train_loss"] for e in epochs], label="train")
    loss.plot(x, [e["val_loss"] for e in epochs], label="val")
    loss.set(xlabel="epoch", ylabel="cross-entropy per word", yscale="log", title="loss")
    loss.legend()
    scored = [(xi, e["val_bleu4"]) for xi, e in zip(x, epochs) if e.get("val_bleu4", -1) >= 0]
    bleu.plot([p[0] for p in scored], [p[1] for p in scored], marker=".", color="tab:green")
    bleu.set(xlabel="epoch", ylabel="BLEU-4 (greedy)", title="val BLEU-4", ylim=(0, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(out, buf.getvalue())


def plot_run(run_dir: str, *, features: str, images: int) -> None:
    """``RUN/curves.png`` from the run's ``metrics.jsonl``, and ``RUN/attention/*.png`` for the first ``images``
    val images of ``features`` (captioned by the run's best checkpoint)."""
    from capray.runlog import read_metrics

    plot_curves(read_metrics(run_dir), storage.join(run_dir, CURVES_FILE))
    if images:
        from capray.evaluation import attend, first_images

        for image in first_images(storage.join(features, "val"), images):
            attend(run_dir, image, storage.join(run_dir, ATTENTION_DIR, f"{_plot_name(image)}.png"))


def _plot_name(image: str) -> str:
    """A file name for an image's plot: its own name, or SHARD-KEY for a shard's sample."""
    from capray.shards import shard_of

    shard = shard_of(image)
    if shard == image:
        return storage.basename(image).rsplit(".", 1)[0]
    return storage.basename(shard).rsplit(".", 1)[0] + "-" + image[len(shard) + 1:].replace("/", "-")


def _upsample(att: np.ndarray, height: int, width: int) -> np.ndarray:
    """One (h, w) map resized to (height, width) with bilinear interpolation."""
    return np.asarray(Image.fromarray(att).resize((width, height), Image.Resampling.BILINEAR))


def _check(image: np.ndarray, words: list[str], attention: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image, attention = np.asarray(image), np.asarray(attention, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be a (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
    if attention.ndim != 3:
        raise ValueError(f"attention must be (T, h, w), got shape {attention.shape}")
    if len(words) == 0:
        raise ValueError("no words to plot")
    if len(words) != attention.shape[0]:
        raise ValueError(f"{len(words)} words but {attention.shape[0]} attention maps")
    if not np.isfinite(attention).all():
        raise ValueError("attention contains NaN or infinite values")
    return image, attention
