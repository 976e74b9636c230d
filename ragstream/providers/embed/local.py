"""The local embedder.

`LocalEmbedder` is a feature-hashing embedder: no model, no download, no randomness. A text's
features are its lowercased word unigrams and bigrams and the character trigrams of its words;
each feature is hashed with BLAKE2b (not Python's per-process salted `hash()`) to a dimension
and a sign, weighted by `1 + ln(tf)` (common English function words count less), and the vector
is L2-normalised, so cosine similarity is a dot product. The same text gives the same vector in
every process and on every machine. It finds shared words and phrases, not meaning: a semantic
model is a separate provider.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import math
import operator
import re
from collections import Counter
from collections.abc import Callable
from typing import Final

from ragstream.providers.embed.port import Embedder, EmbedResult

LOCAL_MODEL: Final = "local-hash-v1"
PROVIDER: Final = "local"

_WORD: Final = re.compile(r"\w+")
_UNIGRAM_WEIGHT: Final = 1.0
_BIGRAM_WEIGHT: Final = 1.0
_TRIGRAM_WEIGHT: Final = 0.25
_STOPWORD_WEIGHT: Final = 0.2
_TF_WEIGHTS: Final = [0.0] + [1.0 + math.log(tf) for tf in range(1, 256)]
# Features whose dimension and sign are kept, per size of vector (some 200 bytes each, so up to
# about 25 MiB): a corpus reuses most of its features.
_SLOT_CACHE_SIZE: Final = 1 << 17
_SLOT_CACHES: dict[int, dict[str, tuple[int, float]]] = {}
_STOPWORDS: Final = frozenset(
    "a an and are as at be but by for from has have in is it its of on or that the this to "
    "was were will with you your we our they their not can if then than so do does".split()
)


class LocalEmbedder(Embedder):
    """Deterministic hashed bag of words and phrases, L2-normalised."""

    def __init__(self, dimensions: int = 512) -> None:
        if dimensions < 1:
            raise ValueError("dimensions must be positive")
        self._dimensions = dimensions
        # one per size of vector in the process (the embed stage has two embedders)
        self._slot_cache = _SLOT_CACHES.setdefault(dimensions, {})

    @property
    def name(self) -> str:
        return PROVIDER

    @property
    def model(self) -> str:
        return LOCAL_MODEL

    @property
    def dimensions(self) -> int:
        return self._dimensions

    async def embed(self, texts: list[str]) -> EmbedResult:
        """Embed in a worker thread, so a large batch does not stall the event loop."""
        return await asyncio.to_thread(self.embed_sync, texts)

    def embed_sync(self, texts: list[str]) -> EmbedResult:
        vectors: list[list[float]] = []
        tokens = 0
        for text in texts:
            vector, words = self.vector_of(text)
            vectors.append(vector)
            tokens += words
        return EmbedResult(
            vectors=vectors, token_count=tokens, provider=PROVIDER, model=LOCAL_MODEL
        )

    def vector_of(self, text: str) -> tuple[list[float], int]:
        """One text's vector and its word count (what `embed` counts as tokens)."""
        words = _WORD.findall(text.casefold())
        vector = [0.0] * self._dimensions
        if not _add_features(vector, words, self._slots) and text.strip():
            index, sign = self._slots("raw:" + text.strip())
            vector[index] += sign * 1.0
        norm = math.sqrt(sum(map(operator.mul, vector, vector)))
        if norm > 0.0:
            vector = list(map(norm.__rtruediv__, vector))  # x / norm
        return vector, len(words)

    def _slots(self, feature: str) -> tuple[int, float]:
        """A feature's dimension and sign (cached: a corpus reuses most of its features)."""
        slot = self._slot_cache.get(feature)
        if slot is None:
            if len(self._slot_cache) >= _SLOT_CACHE_SIZE:
                self._slot_cache.clear()
            h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "big")
            slot = self._slot_cache[feature] = (h % self._dimensions, 1.0 if h >> 63 else -1.0)
        return slot


def _add_features(
    vector: list[float], words: list[str], slot_of: Callable[[str], tuple[int, float]]
) -> bool:
    """Add each feature's signed weight, (1 + ln tf) times its kind's, to its dimension: the
    unigrams, then the bigrams, then the trigrams, each kind in order of first appearance (the
    order fixes the float sums, so a text's vector is the same bits everywhere). Whether there
    was any feature."""
    unigrams = Counter(words)
    bigrams = Counter(f"b:{a} {b}" for a, b in itertools.pairwise(words))
    trigrams: dict[str, int] = {}
    for word, tf in unigrams.items():
        for trigram in _trigrams(word):
            trigrams[trigram] = trigrams.get(trigram, 0) + tf
    for word, tf in unigrams.items():
        kind = _STOPWORD_WEIGHT if word in _STOPWORDS else _UNIGRAM_WEIGHT
        index, sign = slot_of("w:" + word)
        vector[index] += sign * (_tf_weight(tf) * kind)
    for bigram, tf in bigrams.items():
        index, sign = slot_of(bigram)
        vector[index] += sign * (_tf_weight(tf) * _BIGRAM_WEIGHT)
    for trigram, tf in trigrams.items():
        index, sign = slot_of(trigram)
        vector[index] += sign * (_tf_weight(tf) * _TRIGRAM_WEIGHT)
    return bool(unigrams)


def _tf_weight(tf: int) -> float:
    """1 + ln tf (tables the common small counts)."""
    return _TF_WEIGHTS[tf] if tf < len(_TF_WEIGHTS) else 1.0 + math.log(tf)


@functools.lru_cache(maxsize=1 << 16)
def _trigrams(word: str) -> tuple[str, ...]:
    padded = f"<{word}>"
    return tuple("c:" + padded[k : k + 3] for k in range(len(padded) - 2))
