"""Tokenisation and the word vocabulary (built from the train split only)."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

from capray import storage
from capray.errors import ConfigError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # PAD must stay at index 0: padded positions are masked by id 0

_NON_WORD = re.compile(r"[^\w' ]+")


def tokenize(text: str) -> list[str]:
    """Lower-case, punctuation stripped, split on whitespace (the seed's standardisation)."""
    text = text.lower().replace("\u2019", "'").replace("'", "")
    return _NON_WORD.sub(" ", text).replace("_", " ").split()


def word_counts(captions: Iterable[str]) -> Counter:
    """How often each word (``tokenize``) occurs in ``captions``."""
    return Counter(w for c in captions for w in tokenize(c))


class Vocabulary:
    """An ordered word list: ids are positions, the four special tokens come first."""

    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ConfigError(f"a vocabulary must start with {list(SPECIALS)}, got {list(words[:4])}")
        if len(set(words)) != len(words):
            raise ConfigError("a vocabulary must not repeat words")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.start_id, self.end_id, self.unk_id = (self.index[s] for s in SPECIALS)

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    @classmethod
    def build(cls, captions: Iterable[str], *, size: int = 5000, min_count: int = 1) -> "Vocabulary":
        """The ``size`` most frequent words seen at least ``min_count`` times (specials included).

        Ties are broken alphabetically so the same captions always give the same vocabulary.
        """
        return cls.from_counts(word_counts(captions), size=size, min_count=min_count)

    @classmethod
    def from_counts(cls, counts: Counter, *, size: int = 5000, min_count: int = 1) -> "Vocabulary":
        """``build`` from word counts already made (``word_counts``, merged over shards read in tasks)."""
        if size <= len(SPECIALS):
            raise ConfigError(f"vocabulary size must exceed {len(SPECIALS)}, got {size}")
        if min_count < 1:
            raise ConfigError(f"min word count must be at least 1, got {min_count}")
        ranked = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
                        key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + ranked[: size - len(SPECIALS)])

    def encode(self, caption: str, *, max_length: int | None = None) -> list[int]:
        """``<start> w1 .. wn <end>`` as ids; unknown words become ``<unk>``; truncated to ``max_length``."""
        ids = [self.start_id] + [self.index.get(w, self.unk_id) for w in tokenize(caption)] + [self.end_id]
        if max_length is not None and len(ids) > max_length:
            ids = ids[: max_length - 1] + [self.end_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first ``<end>``; ``<start>`` and ``<pad>`` dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            words.append(self.words[i])
        return " ".join(words)

    def to_json(self) -> dict:
        return {"words": self.words}

    @classmethod
    def from_json(cls, obj: dict) -> "Vocabulary":
        if not isinstance(obj, dict) or not isinstance(obj.get("words"), list):
            raise ConfigError('a vocabulary file must be {"words": [...]}')
        return cls(obj["words"])

    def save(self, uri: str) -> None:
        storage.write_json(uri, self.to_json())

    @classmethod
    def load(cls, uri: str) -> "Vocabulary":
        try:
            return cls.from_json(storage.read_json(uri))
        except storage.StorageError:
            raise  # already names the file
        except ValueError as exc:
            raise ConfigError(f"{uri}: {exc}") from exc
