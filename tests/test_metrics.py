"""capray.metrics: the COCO scorers on our own tokenisation."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from capray.metrics import METRICS, score_captions

# Distinct captions of at least four words, so every n-gram order exists and CIDEr's IDF is non-zero.
REFERENCES = {
    "1": ["a dog runs across the green grass", "a brown dog running on a lawn"],
    "2": ["two people ride bicycles down a city street", "cyclists on a busy road"],
    "3": ["a plate of pasta with tomato sauce", "spaghetti served on a white plate"],
}


def test_identical_captions_score_perfectly():
    refs = {i: caps[:1] for i, caps in REFERENCES.items()}
    scores = score_captions(refs, {i: caps[0] for i, caps in refs.items()})
    assert set(scores) == set(METRICS)
    for name in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert scores[name] == pytest.approx(1.0, abs=1e-6), name
    assert scores["cider"] == pytest.approx(10.0, abs=1e-6)  # CIDEr-D is 10x a cosine similarity


def test_unrelated_captions_score_near_zero():
    hyps = {"1": "purple elephants juggle violins", "2": "an empty frozen lake at midnight",
            "3": "clocks melting over tall mountains"}
    scores = score_captions(REFERENCES, hyps)
    for name, value in scores.items():
        assert value < 1e-6, name


def test_bleu1_matches_hand_computation():
    refs = {"1": ["the cat is on the mat", "there is a cat on the mat"], "2": ["a dog in a park"]}
    hyps = {"1": "the the the cat mat", "2": "a dog in a park"}
    # Clipped unigram matches: "the" 3 -> 2 (at most twice in one reference), cat 1, mat 1, and 5 of 5
    # for image 2. Brevity penalty over the corpus: hypothesis length 5 + 5, closest reference
    # lengths 6 (|6-5| < |7-5|) + 5.
    precision = (4 + 5) / (5 + 5)
    brevity = math.exp(1 - (6 + 5) / (5 + 5))
    assert score_captions(refs, hyps)["bleu1"] == pytest.approx(precision * brevity, rel=1e-6)


def test_case_and_punctuation_do_not_change_scores():
    hyps = {"1": "a dog running on the grass", "2": "people riding bikes on a street",
            "3": "a plate of spaghetti"}
    noisy_refs = {i: [c.upper() + "." for c in caps] for i, caps in REFERENCES.items()}
    noisy_hyps = {i: f"  {h.title()}!! " for i, h in hyps.items()}
    assert score_captions(noisy_refs, noisy_hyps) == score_captions(REFERENCES, hyps)


def test_empty_hypothesis_scores_zero():
    # The decoder may stop at once; that caption is legal and earns nothing.
    scores = score_captions({"1": REFERENCES["1"]}, {"1": "..."})
    assert scores["bleu1"] < 1e-6 and scores["rouge_l"] == 0.0 and scores["cider"] == 0.0


def test_cider_is_zero_for_a_single_image():
    # IDF is computed over the scored images' references: with one image every n-gram has IDF 0.
    caption = REFERENCES["1"][0]
    scores = score_captions({"1": [caption]}, {"1": caption})
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["cider"] == 0.0


def test_scoring_prints_nothing(capsys):
    score_captions(REFERENCES, {i: caps[1] for i, caps in REFERENCES.items()})
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("refs, hyps", [
    ({"1": ["a dog"]}, {"2": "a dog"}),                      # different ids
    ({"1": ["a dog"], "2": ["a cat"]}, {"1": "a dog"}),      # a reference without a hypothesis
    ({"1": ["a dog"]}, {"1": "a dog", "2": "a cat"}),        # a hypothesis without references
    ({"1": []}, {"1": "a dog"}),                             # no references for an id
    ({"1": "a dog"}, {"1": "a dog"}),                        # a string, not a list of references
    ({"1": ["?!"]}, {"1": "a dog"}),                         # a reference with no words
    ({}, {}),                                                # nothing to score
])
def test_invalid_inputs_raise(refs, hyps):
    with pytest.raises(ValueError):
        score_captions(refs, hyps)


@pytest.mark.parametrize("module", ["capray.evaluation", "capray.cli", "capray.training", "capray.captioning"])
def test_the_jobs_import_without_the_shapes_world(module):
    # The shapes world is test and demo data: evaluate loads it only for a dataset with ground-truth objects.
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('capray.synth')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
