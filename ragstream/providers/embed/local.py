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
import re
from collections import Counter
from typing import Final

from ragstream.providers.embed.port import Embedder, EmbedResult

LOCAL_MODEL: Final = "local-hash-v1"
PROVIDER: Final = "local"

_WORD: Final = re.compile(r"\w+")
_UNIGRAM_WEIGHT: Final = 1.0
_BIGRAM_WEIGHT: Final = 1.0
_TRIGRAM_WEIGHT: Final = 0.25
_STOPWORD_WEIGHT: Final = 0.2
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
        features = _features(words)
        if not features and text.strip():
            features = {"raw:" + text.strip(): 1.0}
        vector = [0.0] * self._dimensions
        for feature, weight in features.items():
            h = _hash64(feature)
            sign = 1.0 if h >> 63 else -1.0
            vector[h % self._dimensions] += sign * weight
        norm = math.sqrt(sum(x * x for x in vector))
        if norm > 0.0:
            vector = [x / norm for x in vector]
        return vector, len(words)


def _features(words: list[str]) -> dict[str, float]:
    """Feature -> weight: (1 + ln tf) times the weight of the feature's kind."""
    unigrams = Counter(words)
    bigrams = Counter(f"b:{a} {b}" for a, b in itertools.pairwise(words))
    trigrams: Counter[str] = Counter()
    for word, tf in unigrams.items():
        for trigram in _trigrams(word):
            trigrams[trigram] += tf
    weighted: dict[str, float] = {}
    for word, tf in unigrams.items():
        kind = _STOPWORD_WEIGHT if word in _STOPWORDS else _UNIGRAM_WEIGHT
        weighted["w:" + word] = (1.0 + math.log(tf)) * kind
    for bigram, tf in bigrams.items():
        weighted[bigram] = (1.0 + math.log(tf)) * _BIGRAM_WEIGHT
    for trigram, tf in trigrams.items():
        weighted[trigram] = (1.0 + math.log(tf)) * _TRIGRAM_WEIGHT
    return weighted


@functools.lru_cache(maxsize=1 << 16)
def _trigrams(word: str) -> tuple[str, ...]:
    padded = f"<{word}>"
    return tuple("c:" + padded[k : k + 3] for k in range(len(padded) - 2))


@functools.lru_cache(maxsize=1 << 17)
def _hash64(feature: str) -> int:
    return int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "big")
