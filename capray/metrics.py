"""Caption metrics: BLEU-1..4, ROUGE-L and CIDEr-D with the COCO caption scorers (pycocoevalcap).

The COCO evaluation tokenises with Stanford's PTBTokenizer, which needs Java. We tokenise with
``capray.vocab.tokenize`` instead (the same words the model is trained on), so the scores are close
to, but not identical with, the official server's. Only pycocoevalcap's tokenizer, METEOR and SPICE
need Java; the three scorers used here are pure Python.

Attention grounding (``attention_grounding``) asks whether the decoder looked at the object a word
names, on datasets with ground-truth boxes (the shapes world).
"""
from __future__ import annotations

import math

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from capray.errors import ConfigError
from capray.vocab import tokenize

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")


def score_captions(references: dict[str, list[str]], hypotheses: dict[str, str]) -> dict[str, float]:
    """Corpus-level scores of one generated caption per image against that image's references.

    ``references`` and ``hypotheses`` are keyed by image id and must hold the same ids. Scores are on
    the scale pycocoevalcap reports: BLEU and ROUGE-L in [0, 1]; CIDEr-D is 10x a mean cosine
    similarity, so it can exceed 1 (10 for a caption identical to its single reference).

    CIDEr weights n-grams by their rarity (IDF) across the references of the images scored together,
    so it needs a corpus: a single image always scores 0, and a handful of images gives a noisy value.
    """
    gts, res = _prepare(references, hypotheses)
    # verbose=0: Bleu otherwise prints its n-gram counts and length ratio to stdout on every call.
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge_l, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return dict(zip(METRICS, (*(float(b) for b in bleu), float(rouge_l), float(cider))))


def _prepare(references: dict[str, list[str]],
             hypotheses: dict[str, str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Validated inputs, tokenised and re-joined by single spaces, in the scorers' ``{id: [str]}`` form."""
    if not hypotheses:
        raise ValueError("no captions to score")
    missing_refs = sorted(set(hypotheses) - set(references))
    missing_hyps = sorted(set(references) - set(hypotheses))
    if missing_refs or missing_hyps:
        raise ValueError(f"references and hypotheses must cover the same ids: "
                         f"{len(missing_refs)} without references (e.g. {missing_refs[:3]}), "
                         f"{len(missing_hyps)} without a hypothesis (e.g. {missing_hyps[:3]})")
    gts, res = {}, {}
    for image_id in sorted(hypotheses):
        refs, hyp = references[image_id], hypotheses[image_id]
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)):
            raise ValueError(f"{image_id!r}: references must be a list of captions, got {type(refs).__name__}")
        if not isinstance(hyp, str):
            raise ValueError(f"{image_id!r}: a hypothesis must be one caption string, got {type(hyp).__name__}")
        gts[image_id] = [" ".join(tokenize(r)) for r in refs]
        if not gts[image_id]:
            raise ConfigError(f"{image_id!r}: no reference captions (fix the annotations)")
        if not all(gts[image_id]):
            raise ConfigError(f"{image_id!r}: a reference caption has no words: {list(refs)} (fix the annotations)")
        # An empty hypothesis (the decoder stopped at once) is legal and simply scores 0.
        res[image_id] = [" ".join(tokenize(hyp))]
    return gts, res


def cell_overlaps(box: tuple[float, float, float, float], side: int) -> np.ndarray:
    """(side, side): the fraction of each encoder grid cell covered by ``box``.

    ``box`` is (x0, y0, x1, y1) as fractions of the image's width and height (x1, y1 exclusive). The
    grid is the encoder's h × w feature map laid evenly over the whole resized image, row-major like
    the regions (region ``r·side + c`` is row ``r`` from the top, column ``c`` from the left).
    """
    edges = np.linspace(0.0, 1.0, side + 1)
    x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in box)
    cover_x = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0.0, None) * side  # (w,)
    cover_y = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0.0, None) * side  # (h,)
    return np.outer(cover_y, cover_x)  # (h, w)


def attention_grounding(words: list[str], attention: np.ndarray,
                        objects: list[dict]) -> tuple[float, float, int]:
    """Where the decoder looked when it named an object: (attention mass sum, chance sum, words counted).

    A word counts when it is the ``color`` or the ``shape`` of exactly one of ``objects`` (a word that
    names two objects, both red say, or none is skipped). For a counted word emitted at step t, its
    mass is Σ over grid cells of attention[t, cell] × the cell's overlap fraction with that object's
    box (``cell_overlaps``); attention sums to 1 over the cells, so the mass is in [0, 1]: 1 when the
    decoder looked only inside the box. Its chance value is the box's share of the image, the mass
    uniform attention would put there. ``attention`` is (T, P) for the T ``words``; ``objects`` carry
    ``box`` as fractions of the image (x0, y0, x1, y1). The split's grounding is the sum of the
    masses over the sum of counted words (likewise for chance).
    """
    attention = np.asarray(attention, dtype=np.float64)
    side = math.isqrt(attention.shape[1])
    if side * side != attention.shape[1]:
        raise ValueError(f"{attention.shape[1]} regions do not form a square grid")
    mass = chance = 0.0
    count = 0
    for word, alpha in zip(words, attention):
        named = [o for o in objects if word in (o["color"], o["shape"])]
        if len(named) != 1:
            continue
        overlap = cell_overlaps(named[0]["box"], side).reshape(-1)  # (P,)
        mass += float(alpha @ overlap)
        chance += float(overlap.mean())
        count += 1
    return mass, chance, count
