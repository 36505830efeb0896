"""capray.vocab: tokenisation and the word vocabulary."""
from __future__ import annotations

import json
import random

import pytest

from capray.vocab import END, PAD, SPECIALS, START, UNK, Vocabulary, tokenize

CAPTIONS = [
    "A dog runs on the grass.",
    "The dog is brown",
    "a cat sits on a mat",
    "Two dogs, one ball!",
]


# --- tokenize ----------------------------------------------------------------------------------------

def test_tokenize_lower_cases():
    assert tokenize("A Big RED Bus") == ["a", "big", "red", "bus"]


def test_tokenize_strips_punctuation():
    assert tokenize("A dog, a cat; and (a) bird!? Yes... \"quoted\"") == \
        ["a", "dog", "a", "cat", "and", "a", "bird", "yes", "quoted"]


def test_tokenize_splits_on_hyphens_and_any_whitespace():
    assert tokenize("a well-known\tdog\non  grass ") == ["a", "well", "known", "dog", "on", "grass"]


def test_tokenize_removes_apostrophes_inside_words():
    assert tokenize("The dog's ball isn't red") == ["the", "dogs", "ball", "isnt", "red"]


def test_tokenize_keeps_digits():
    assert tokenize("2 dogs and 10 cats") == ["2", "dogs", "and", "10", "cats"]


def test_tokenize_empty_and_punctuation_only():
    assert tokenize("") == []
    assert tokenize(" .,!? ") == []


def test_tokenize_keeps_accented_letters():
    # Only punctuation is stripped: a letter outside a-z is part of its word, not a separator.
    assert tokenize("A café in Zürich") == ["a", "café", "in", "zürich"]


def test_tokenize_treats_a_typographic_apostrophe_like_a_straight_one():
    assert tokenize("the dog\u2019s ball") == tokenize("the dog's ball") == ["the", "dogs", "ball"]


# --- build -------------------------------------------------------------------------------------------

def test_specials_come_first_with_pad_zero():
    vocab = Vocabulary.build(CAPTIONS)
    assert vocab.words[:4] == list(SPECIALS) == [PAD, START, END, UNK]
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)


def test_words_are_ordered_by_frequency_then_alphabetically():
    vocab = Vocabulary.build(["b a c", "a b", "a d", "e"])
    # a:3, b:2, then c, d, e once each in alphabetical order
    assert vocab.words[4:] == ["a", "b", "c", "d", "e"]


def test_build_counts_tokens_not_raw_strings():
    vocab = Vocabulary.build(["Dog.", "dog", "DOG!", "cat"])
    assert vocab.words[4:] == ["dog", "cat"]


def test_size_keeps_the_most_frequent_words_specials_included():
    vocab = Vocabulary.build(["a a a b b c", "d"], size=6)
    assert len(vocab) == 6
    assert vocab.words[4:] == ["a", "b"]


def test_min_count_drops_rare_words():
    vocab = Vocabulary.build(["a a b b c", "a d"], min_count=2)
    assert vocab.words[4:] == ["a", "b"]


def test_build_is_deterministic_whatever_the_caption_order():
    captions = [f"word{i % 7} word{i % 3} thing{i % 5}" for i in range(50)]
    shuffled = captions[:]
    random.Random(0).shuffle(shuffled)
    assert Vocabulary.build(captions, size=8) == Vocabulary.build(shuffled, size=8)


def test_build_accepts_a_generator():
    assert Vocabulary.build(c for c in CAPTIONS) == Vocabulary.build(CAPTIONS)


@pytest.mark.parametrize("kwargs", [dict(size=4), dict(size=0), dict(min_count=0)])
def test_build_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        Vocabulary.build(CAPTIONS, **kwargs)


@pytest.mark.parametrize("words", [
    ["a", "b"],
    [START, PAD, END, UNK, "a"],
    [PAD, START, END, UNK, "a", "a"],
])
def test_constructor_rejects_bad_word_lists(words):
    with pytest.raises(ValueError):
        Vocabulary(words)


# --- encode / decode ---------------------------------------------------------------------------------

def test_encode_wraps_with_start_and_end():
    vocab = Vocabulary([PAD, START, END, UNK, "a", "dog"])
    assert vocab.encode("A dog!") == [1, 4, 5, 2]


def test_encode_decode_round_trip():
    vocab = Vocabulary.build(CAPTIONS)
    for caption in CAPTIONS:
        assert vocab.decode(vocab.encode(caption)) == " ".join(tokenize(caption))


def test_unseen_words_become_unk():
    vocab = Vocabulary.build(CAPTIONS)
    ids = vocab.encode("a zebra runs")
    assert ids == [vocab.start_id, vocab.index["a"], vocab.unk_id, vocab.index["runs"], vocab.end_id]
    assert vocab.decode(ids) == "a <unk> runs"


def test_words_cut_by_size_become_unk():
    vocab = Vocabulary.build(["a a b"], size=5)
    assert vocab.encode("a b") == [1, 4, vocab.unk_id, 2]


def test_max_length_truncates_and_keeps_end():
    vocab = Vocabulary.build(["one two three four five six"])
    ids = vocab.encode("one two three four five six", max_length=5)
    assert len(ids) == 5
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids) == "one two three"


def test_max_length_longer_than_caption_changes_nothing():
    vocab = Vocabulary.build(["one two"])
    assert vocab.encode("one two", max_length=4) == vocab.encode("one two") == [1, 4, 5, 2]
    assert vocab.encode("one two", max_length=10) == [1, 4, 5, 2]


def test_decode_stops_at_end_and_skips_start_and_pad():
    vocab = Vocabulary([PAD, START, END, UNK, "a", "dog"])
    assert vocab.decode([1, 4, 0, 5, 2, 4, 5]) == "a dog"
    assert vocab.decode([4, 5]) == "a dog"  # no <end>: everything


def test_decode_accepts_tensor_like_ids():
    import torch

    vocab = Vocabulary([PAD, START, END, UNK, "a", "dog"])
    assert vocab.decode(torch.tensor([4, 5, 2, 0])) == "a dog"


# --- files -------------------------------------------------------------------------------------------

def test_save_load_round_trip_local(tmp_path):
    vocab = Vocabulary.build(CAPTIONS)
    uri = str(tmp_path / "run" / "vocab.json")
    vocab.save(uri)
    assert Vocabulary.load(uri) == vocab
    assert json.loads((tmp_path / "run" / "vocab.json").read_text()) == {"words": vocab.words}


def test_save_load_round_trip_s3(s3_bucket):
    vocab = Vocabulary.build(CAPTIONS + ["déjà vu"])
    uri = f"{s3_bucket}/features/vocab.json"
    vocab.save(uri)
    loaded = Vocabulary.load(uri)
    assert loaded == vocab
    assert loaded.encode("a dog") == vocab.encode("a dog")


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps(["<pad>", "<start>", "<end>", "<unk>"]),
    json.dumps({"words": "a b c"}),
    json.dumps({"tokens": ["<pad>", "<start>", "<end>", "<unk>"]}),
    json.dumps({"words": ["<start>", "<pad>", "<end>", "<unk>"]}),
    json.dumps({"words": ["<pad>", "<start>", "<end>", "<unk>", "a", "a"]}),
])
def test_malformed_vocab_file_names_the_file(tmp_path, content):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="vocab.json"):
        Vocabulary.load(str(path))


@pytest.mark.parametrize("content", [None, "{not json"])
def test_unreadable_vocab_file_is_named_once(tmp_path, content):
    # The user sees this line on stderr: "<uri>: no such file", not "<uri>: <uri>: no such file".
    path = tmp_path / "vocab.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as info:
        Vocabulary.load(str(path))
    assert str(info.value).count(str(path)) == 1, str(info.value)
