"""The paid services' providers, each port beside its implementations, and what guards them.

    parse/            Parser (the port), LocalParser, LlamaParseParser and its JobTracker
    embed/            Embedder (the port), LocalEmbedder, OpenAIEmbedder
    select            embedder_for / parser_for: real, local or hybrid, each behind its breaker
    modes             SwitchingEmbedder / SwitchingParser: the mode set on the control topic
    circuit           CircuitBreaker: closed, open, half-open, per service
    circuit_reports   CircuitReporter: each worker's breaker states on the control topic
    ratelimit         RateLimiter: per-minute request and token budgets fed by x-ratelimit-*

Nothing is imported here: the SDK-bound modules (openai, httpx) load only when a real provider
is asked for, and the local parser's child processes load only what parsing needs.
"""
