"""Plots: where the decoder looked for each word (the TF tutorial's ``plot_attention``) and a run's curves.

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
HEATMAP_ALPHA = 0.5


def plot_attention(image: np.ndarray, words: list[str], attention: np.ndarray, out: str, *,
                   title: str | None = None) -> None:
    """Write one PNG to ``out``: a panel per word, the image overlaid with that word's attention.

    ``image`` is (H, W, 3) uint8; ``attention`` is (T, h, w), one map over the encoder's h x w grid per
    word (reshape the model's (T, P) weights first). Each map is upsampled bilinearly to the image size
    and coloured from 0 to its own maximum, so a uniform map covers the whole image evenly.
    """
    image, attention = _check(image, words, attention)
    height, width = image.shape[:2]
    num_cols = min(len(words), PANELS_PER_ROW)
    num_rows = math.ceil(len(words) / PANELS_PER_ROW)
    panel_height = PANEL_INCHES * height / width
    fig = Figure(figsize=(num_cols * PANEL_INCHES, num_rows * (panel_height + 0.35) + (0.4 if title else 0)),
                 dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (word, att) in enumerate(zip(words, attention)):
        ax = fig.add_subplot(num_rows, num_cols, i + 1)
        ax.imshow(image)
        ax.imshow(_upsample(att, height, width), cmap=HEATMAP_CMAP, alpha=HEATMAP_ALPHA,
                  vmin=0.0, vmax=float(att.max()))
        ax.set_title(word, fontsize=11, parse_math=False)  # a "$" in a word must not start mathtext
        ax.axis("off")
    if title:
        fig.suptitle(title, parse_math=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(out, buf.getvalue())


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
