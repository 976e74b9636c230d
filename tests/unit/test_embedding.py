"""The local embedder: deterministic across processes, unit length, and good enough to search."""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import re
import struct
import subprocess
import sys

import pytest

from ragstream.chunking import Chunk, Chunker
from ragstream.providers.embed.local import LocalEmbedder
from ragstream.providers.embed.port import Embedder, EmbedResult
from ragstream.providers.parse.local import LocalParser
from ragstream.samples import sample_dir, sample_manifest
from ragstream.settings import ChunkSettings, ParseSettings
from ragstream.tokens import get_tokenizer


def _dot(a: list[float], b: list[float]) -> float:
    return math.fsum(map(operator.mul, a, b))


async def _sample_chunks(max_tokens: int) -> list[Chunk]:
    parser = LocalParser(ParseSettings())
    chunker = Chunker(ChunkSettings(max_tokens=max_tokens, overlap_tokens=0), get_tokenizer())
    chunks: list[Chunk] = []
    for entry in sample_manifest():
        if entry["duplicate_of"]:
            continue
        data = (sample_dir() / entry["filename"]).read_bytes()
        parsed = await parser.parse(
            data, filename=entry["filename"], content_type=entry["content_type"]
        )
        chunks.extend(chunker.chunk(parsed.markdown))
    return chunks


def test_fits_the_embedder_port() -> None:
    embedder: Embedder = LocalEmbedder(256)
    assert (embedder.name, embedder.model, embedder.dimensions) == ("local", "local-hash-v1", 256)


@pytest.mark.parametrize("dimensions", [8, 512, 1536])
async def test_vectors_have_the_dimension_and_unit_length(dimensions: int) -> None:
    texts = ["Kafka consumer groups", "a", "Ünïcödé 日本語", "!!!", "word " * 2000]
    result = await LocalEmbedder(dimensions).embed(texts)
    assert isinstance(result, EmbedResult)
    assert len(result.vectors) == len(texts)
    for vector in result.vectors:
        assert len(vector) == dimensions
        assert math.isclose(math.sqrt(_dot(vector, vector)), 1.0, rel_tol=1e-9)


async def test_empty_text_is_the_zero_vector_and_tokens_are_words() -> None:
    result = await LocalEmbedder(64).embed(["", "  ", "two words", "one, two; three!"])
    assert result.vectors[0] == [0.0] * 64 and result.vectors[1] == [0.0] * 64
    assert result.token_count == 5
    assert (await LocalEmbedder(64).embed([])) == EmbedResult(
        vectors=[], token_count=0, provider="local", model="local-hash-v1"
    )


async def test_same_text_same_vector_in_a_batch_and_alone() -> None:
    embedder = LocalEmbedder(128)
    texts = ["pgvector HNSW index", "sourdough starter", "pgvector HNSW index"]
    batch = await embedder.embed(texts)
    assert batch.vectors[0] == batch.vectors[2]
    assert batch.vectors[1] == (await embedder.embed([texts[1]])).vectors[0]
    assert batch.vectors[0] != batch.vectors[1]


# sha256 of each vector's float64 bytes: a stored or cached vector of local-hash-v1 stays the
# vector the embedder makes for its text, bit for bit, from one release to the next.
_FINGERPRINTS = [
    ("Static membership removes another source of churn.", 7, "9e4faa469a150547"),
    (
        "The the THE the: a word, a Word, and a WORD again; naïve café Zoë 日本語 ß.",
        17,
        "8cf66e878fb7e865",
    ),
    ("!!! ???", 0, "8179b49109996295"),
    ("", 0, "ad7facb2586fc6e9"),
    ("word " * 300, 300, "1230501b0320c0ed"),
]


@pytest.mark.parametrize(("text", "words", "fingerprint"), _FINGERPRINTS)
def test_a_text_keeps_its_vector_bit_for_bit(text: str, words: int, fingerprint: str) -> None:
    vector, counted = LocalEmbedder(512).vector_of(text)
    packed = struct.pack(f"<{len(vector)}d", *vector)
    assert (counted, hashlib.sha256(packed).hexdigest()[:16]) == (words, fingerprint)


def test_same_vector_in_other_processes_whatever_their_hash_seed() -> None:
    text = "Static membership removes another source of churn."
    expected = LocalEmbedder(96).embed_sync([text]).vectors[0]
    script = (
        "import json, sys; from ragstream.providers.embed.local import LocalEmbedder; "
        "print(json.dumps(LocalEmbedder(96).embed_sync([sys.argv[1]]).vectors[0]))"
    )
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script, text],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == expected


async def test_related_text_is_closer_than_unrelated_text() -> None:
    embedder = LocalEmbedder(512)
    query, kafka, bread = (
        await embedder.embed(
            [
                "how does a kafka consumer group rebalance partitions",
                "The cooperative sticky assignor rebalances partitions of a consumer group.",
                "Shape a tight boule and proof the sourdough in a floured banneton.",
            ]
        )
    ).vectors
    assert _dot(query, kafka) > _dot(query, bread) + 0.2


async def test_a_copied_sentence_ranks_its_own_chunk_first() -> None:
    chunks = await _sample_chunks(max_tokens=32)
    assert len(chunks) >= 200  # a few hundred candidates from 13 documents on distinct topics
    embedder = LocalEmbedder(512)
    vectors = (await embedder.embed([c.text for c in chunks])).vectors
    queries = [
        (sentence, k)
        for k, chunk in enumerate(chunks)
        for sentence in re.split(r"(?<=[.!?])\s+", chunk.text)
        if len(sentence.split()) >= 5
    ]
    assert len(queries) >= 200
    query_vectors = (await embedder.embed([q for q, _ in queries])).vectors
    misses = []
    for (sentence, _), q in zip(queries, query_vectors, strict=True):
        best = max(range(len(vectors)), key=lambda k: _dot(q, vectors[k]))
        if sentence not in chunks[best].text:
            misses.append((sentence, chunks[best].text))
    assert not misses, misses[:3]


async def test_a_question_finds_its_answer_in_the_sample_set() -> None:
    chunks = await _sample_chunks(max_tokens=200)
    embedder = LocalEmbedder(512)
    vectors = (await embedder.embed([c.text for c in chunks])).vectors
    for question, heading in [
        ("how do I restore a deleted file", "How do I restore a deleted file?"),
        ("what does ef_search do for HNSW queries", "Query time settings"),
        ("varroa mites treatment", "Varroa mites"),
        ("hotel nightly limit in London", "3. Hotels"),
    ]:
        (q,) = (await embedder.embed([question])).vectors
        best = max(range(len(chunks)), key=lambda k: _dot(q, vectors[k]))
        text = chunks[best].text
        assert heading in chunks[best].heading_path or heading in text, (question, text[:120])
