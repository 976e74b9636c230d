"""How many embedding requests 10k chunks take, against the minimum, and how fast they go.

    .venv/bin/python benchmarks/bench_embed_packing.py [--chunks 10000] [--latency-ms 100]

For a few length mixes it packs the chunks three ways: `pack` (what OpenAIEmbedder does),
next-fit (fill a request until the next chunk does not fit), and fixed batches of 256 (the embed
stage's `embed.batch_size`, one request each). The minimum is max(ceil(N / 2048),
ceil(T / 300,000)); `pack` promises at most one more. Then the chunks go for real through
OpenAIEmbedder to the local OpenAI-speaking server (tests/servers/openai_server.py), with
`--latency-ms` added to every answer to stand in for the network and the model, and the
throughput is printed. The local server embeds in Python on one thread, so at zero latency the
figure measures it as much as the client.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Callable, Sequence

from pydantic import SecretStr

from ragstream.providers.embed.openai import (
    MAX_INPUTS,
    MAX_REQUEST_TOKENS,
    OpenAIEmbedder,
    minimum_requests,
    pack,
)
from ragstream.settings import Mode, OpenAISettings
from ragstream.tokens import get_tokenizer
from tests.servers.openai_server import OpenAIServer

WORDS = (
    "stream kafka partition offset embedding vector chunk parse token budget replay consumer "
    "group rebalance commit retry backoff circuit breaker throughput latency"
).split()

MIXES: dict[str, Callable[[random.Random], int]] = {
    # words per chunk (about 1.2 tokens a word here)
    "chunker output (<=400 tokens)": lambda r: r.randint(20, 330),
    "short (5-60 tokens)": lambda r: r.randint(4, 50),
    "mixed (5-8k tokens)": lambda r: r.choice(
        [r.randint(4, 50), r.randint(100, 400), r.randint(1000, 6500)]
    ),
    "long (4-8k tokens)": lambda r: r.randint(3300, 6500),
}


def make_chunks(n: int, words: Callable[[random.Random], int], seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"chunk {i}: " + " ".join(rng.choices(WORDS, k=words(rng))) for i in range(n)]


def next_fit(counts: Sequence[int]) -> int:
    requests, inputs, tokens = 0, MAX_INPUTS, MAX_REQUEST_TOKENS
    for count in counts:
        if inputs + 1 > MAX_INPUTS or tokens + count > MAX_REQUEST_TOKENS:
            requests, inputs, tokens = requests + 1, 0, 0
        inputs, tokens = inputs + 1, tokens + count
    return requests


def fixed_batches(counts: Sequence[int], size: int = 256) -> int:
    """One request per batch of `size` (each batch packed on its own)."""
    return sum(len(pack(counts[i : i + size])) for i in range(0, len(counts), size))


async def throughput(chunks: list[str], latency_s: float, dimensions: int, concurrency: int) -> str:
    with OpenAIServer(latency_s=latency_s) as server:
        settings = OpenAISettings(
            mode=Mode.REAL, base_url=server.base_url, api_key=SecretStr("test-key"), timeout_s=300
        )
        embedder = OpenAIEmbedder(settings, dimensions=dimensions, max_concurrency=concurrency)
        started = time.perf_counter()
        try:
            result = await embedder.embed(chunks)
        finally:
            await embedder.aclose()
        elapsed = time.perf_counter() - started
        refused = len(server.calls) - len(server.ok_calls())
    return (
        f"{len(chunks)} chunks, {result.token_count:,} tokens in {embedder.requests_made} requests"
        f" ({refused} refused) in {elapsed:.2f}s: {len(chunks) / elapsed:,.0f} chunks/s, "
        f"{result.token_count / elapsed:,.0f} tokens/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--dimensions", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    tokenizer = get_tokenizer()

    header = f"{'length mix':<30} {'tokens':>11} {'minimum':>8} {'pack':>5} {'next-fit':>9} {'batches of 256':>15}"
    print(header)
    print("-" * len(header))
    runs: dict[str, list[str]] = {}
    for name, words in MIXES.items():
        chunks = make_chunks(args.chunks, words)
        counts = [tokenizer.count(c) for c in chunks]
        assert max(counts) <= 8192, "a mix must respect the per-input limit"
        started = time.perf_counter()
        packed = len(pack(counts))
        pack_ms = (time.perf_counter() - started) * 1000
        least = minimum_requests(counts)
        assert packed <= least + 1
        print(
            f"{name:<30} {sum(counts):>11,} {least:>8} {packed:>5} {next_fit(counts):>9} "
            f"{fixed_batches(counts):>15}   (pack took {pack_ms:.0f} ms)"
        )
        runs[name] = chunks
    print(
        f"\nlower bound: max(ceil(N/{MAX_INPUTS}), ceil(T/{MAX_REQUEST_TOKENS:,})); pack <= bound + 1"
    )

    print(
        f"\nthroughput through OpenAIEmbedder -> local server "
        f"({args.latency_ms:g} ms added latency, {args.concurrency} requests at once):"
    )
    for name in ("chunker output (<=400 tokens)", "mixed (5-8k tokens)"):
        line = asyncio.run(
            throughput(runs[name], args.latency_ms / 1000, args.dimensions, args.concurrency)
        )
        print(f"  {name:<30} {line}")


if __name__ == "__main__":
    main()
