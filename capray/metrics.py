"""Caption metrics: BLEU-1..4, ROUGE-L and CIDEr-D with the COCO caption scorers (pycocoevalcap).

The COCO evaluation tokenises with Stanford's PTBTokenizer, which needs Java. We tokenise with
``capray.vocab.tokenize`` instead (the same words the model is trained on), so the scores are close
to, but not identical with, the official server's. Only pycocoevalcap's tokenizer, METEOR and SPICE
need Java; the three scorers used here are pure Python.
"""
from __future__ import annotations

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
