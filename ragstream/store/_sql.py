"""The store's SQL, in one place. Dimensions are inlined (validated ints) where the partial HNSW
expression index must match the query's text; everything else is a bind parameter."""

from __future__ import annotations

DOCUMENT_COLUMNS = """
    document_id, tenant_id, filename, content_type, size_bytes, sha256, source_uri, metadata,
    correlation_id, status, status_reason, duplicate_of, forced, page_count, chunk_count,
    current_parse_sha256, current_chunker_version, current_embedding_model,
    current_embedding_dimensions, searchable_chunker_version, uploaded_at, created_at, updated_at
"""

# Serialises registrations of the same content for one tenant (collisions only serialise more).
LOCK_CONTENT = "SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 0))"

# The tenant a document belongs to: every write for a document checks it.
DOCUMENT_TENANT = "SELECT tenant_id FROM documents WHERE document_id = $1"

EXISTING_UPLOAD = """
SELECT tenant_id, sha256, status, duplicate_of FROM documents WHERE document_id = $1 FOR UPDATE
"""

# The earliest document of this tenant with this content that still counts as the original.
ORIGINAL = """
SELECT document_id FROM documents
WHERE tenant_id = $1 AND sha256 = $2 AND document_id <> $3
  AND status NOT IN ('duplicate', 'failed', 'dead-lettered')
ORDER BY created_at, document_id
LIMIT 1
"""

INSERT_DOCUMENT = """
INSERT INTO documents (document_id, tenant_id, filename, content_type, size_bytes, sha256,
                       source_uri, metadata, correlation_id, uploaded_at, status, duplicate_of,
                       forced, status_reason)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
ON CONFLICT (document_id) DO NOTHING
RETURNING true
"""

PROMOTE_FORCED = """
UPDATE documents
SET status = 'uploaded', duplicate_of = NULL, forced = true, status_reason = 'forced',
    stage_rank = 1, updated_at = clock_timestamp()
WHERE document_id = $1 AND status = 'duplicate'
"""

INSERT_PARSE = """
INSERT INTO parse_results (document_id, content_sha256, tenant_id, parser, parser_version,
                           markdown, page_count, title)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (document_id, content_sha256) DO NOTHING
RETURNING true
"""

LOAD_PARSE = """
SELECT markdown, page_count, title FROM parse_results WHERE document_id = $1 AND content_sha256 = $2
"""

CHUNK_SET = """
SELECT d.current_parse_sha256 AS current,
       (SELECT array_agg(DISTINCT c.parse_sha256) FROM chunks c
        WHERE c.document_id = $1 AND c.chunker_version = $2) AS stored
FROM documents d WHERE d.document_id = $1
FOR NO KEY UPDATE OF d
"""

DELETE_CHUNK_SET = "DELETE FROM chunks WHERE document_id = $1 AND chunker_version = $2"

# Rows arrive as parallel arrays: one round trip for the whole set. Heading paths are jagged, so
# each travels as a JSON array text.
INSERT_CHUNKS = """
INSERT INTO chunks (document_id, chunker_version, chunk_index, tenant_id, text, text_sha256,
                    heading_path, token_count, char_start, char_end, page, chunker_settings,
                    parse_sha256)
SELECT $1, $2, u.i, $3, u.t, u.s,
       ARRAY(SELECT jsonb_array_elements_text(u.h::jsonb)), u.tc, u.cs, u.ce, u.p, $4, $5
FROM unnest($6::int[], $7::text[], $8::text[], $9::text[], $10::int[], $11::int[], $12::int[],
            $13::int[]) AS u(i, t, s, h, tc, cs, ce, p)
ORDER BY u.i
ON CONFLICT (document_id, chunker_version, chunk_index) DO NOTHING
"""

LOAD_CHUNKS = """
SELECT chunk_index, text, text_sha256, heading_path, token_count, char_start, char_end, page
FROM chunks WHERE document_id = $1 AND chunker_version = $2
ORDER BY chunk_index
"""

# Only embeddings of the chunk text as it is now are written: a late result for text that a
# re-parse has since replaced is skipped (it still lands in the cache, keyed by its own text).
INSERT_EMBEDDINGS = """
INSERT INTO embeddings AS e (document_id, chunker_version, chunk_index, model, dimensions,
                             tenant_id, text_sha256, provider, embedding)
SELECT $1, $2, u.i, $3, $4, $5, u.s, $6, u.v
FROM unnest($7::int[], $8::text[], $9::vector[]) AS u(i, s, v)
JOIN chunks c ON c.document_id = $1 AND c.chunker_version = $2 AND c.chunk_index = u.i
             AND c.text_sha256 = u.s
ORDER BY u.i
ON CONFLICT (document_id, chunker_version, chunk_index, model, dimensions) DO UPDATE
SET text_sha256 = excluded.text_sha256, embedding = excluded.embedding,
    provider = excluded.provider, created_at = clock_timestamp()
WHERE e.text_sha256 <> excluded.text_sha256
"""

# The embedding cache is scoped: a row's tenant_id is a tenant id, or '' for the cache every
# tenant shares. Rows are written in key order, so two transactions writing the same keys wait
# for each other in one direction only (never a deadlock).
INSERT_CACHE = """
INSERT INTO embedding_cache (tenant_id, model, dimensions, text_sha256, embedding, provider)
SELECT DISTINCT ON (u.t, u.m, u.d, u.s) u.t, u.m, u.d, u.s, u.v, u.p
FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::vector[], $6::text[])
     AS u(t, m, d, s, v, p)
ORDER BY u.t, u.m, u.d, u.s
ON CONFLICT (tenant_id, model, dimensions, text_sha256) DO NOTHING
"""

# A plain read: no lock. (Hits are not counted any more, so `hits` and `last_hit_at` stay as
# they were: a write per hit that nothing read, and its row locks made two batches at once that
# hit the same texts in opposite orders deadlock.)
CACHE_HITS = """
SELECT text_sha256, embedding FROM embedding_cache
WHERE tenant_id = $1 AND model = $2 AND dimensions = $3 AND text_sha256 = ANY($4::text[])
"""

# Forward-only status. A success is applied when
#   - its inputs match what the document points at now (else it is stale: a chunk result cut
#     from a parse the document has since replaced, an embedding of an old chunker version), and
#   - it is progress (a higher rank than the highest success reached), or it starts a new
#     generation at its own stage (a new parse content, chunker version, embedding model).
# A failed / dead-lettered document is left by any later success of that kind (a redrive).
# A success that is neither (a late 'chunked' after 'embedded') changes nothing but may fill in
# a count still missing for the same generation.
ADVANCE_SUCCESS = """
WITH cur AS (
    SELECT d.document_id,
        d.status <> 'duplicate'
        AND NOT ($2 IN ('chunked', 'embedded') AND $4::text <> d.current_parse_sha256) IS TRUE
        AND NOT ($2 = 'embedded' AND $5::text <> d.current_chunker_version) IS TRUE
        AS fresh,
        ($2 = 'parsed' AND $4::text <> d.current_parse_sha256)
        OR ($2 = 'chunked' AND $5::text <> d.current_chunker_version)
        OR ($2 = 'embedded' AND ($6::text <> d.current_embedding_model
                                 OR $7::int <> d.current_embedding_dimensions))
        AS new_generation,
        ragstream_status_rank($2) > d.stage_rank AS progress
    FROM documents d WHERE d.document_id = $1
    FOR NO KEY UPDATE
), decision AS (
    SELECT document_id, fresh AND (progress OR new_generation IS TRUE) AS apply, fresh AS fill
    FROM cur
)
UPDATE documents d SET
    status = CASE WHEN x.apply THEN $2 ELSE d.status END,
    status_reason = CASE WHEN x.apply THEN $3 ELSE d.status_reason END,
    stage_rank = CASE WHEN x.apply THEN ragstream_status_rank($2) ELSE d.stage_rank END,
    current_parse_sha256 = CASE WHEN x.apply THEN coalesce($4, d.current_parse_sha256)
                           ELSE d.current_parse_sha256 END,
    current_chunker_version = CASE WHEN x.apply THEN coalesce($5, d.current_chunker_version)
                              ELSE d.current_chunker_version END,
    current_embedding_model = CASE WHEN x.apply AND $2 = 'embedded'
                              THEN coalesce($6, d.current_embedding_model)
                              ELSE d.current_embedding_model END,
    current_embedding_dimensions = CASE WHEN x.apply AND $2 = 'embedded'
                                   THEN coalesce($7, d.current_embedding_dimensions)
                                   ELSE d.current_embedding_dimensions END,
    searchable_chunker_version = CASE WHEN x.apply AND $2 = 'embedded'
                                 THEN coalesce($5, d.current_chunker_version)
                                 ELSE d.searchable_chunker_version END,
    page_count = CASE WHEN x.apply THEN coalesce($8, d.page_count)
                 ELSE coalesce(d.page_count, $8) END,
    chunk_count = CASE WHEN x.apply THEN coalesce($9, d.chunk_count)
                  ELSE coalesce(d.chunk_count, $9) END,
    updated_at = CASE WHEN x.apply THEN clock_timestamp() ELSE d.updated_at END
FROM decision x
WHERE d.document_id = x.document_id AND (x.apply OR x.fill)
RETURNING x.apply
"""

# A failure counts only while the document has not yet passed the failing stage (without a
# stage: unless it is already embedded); a duplicate stays a duplicate.
ADVANCE_FAILURE = """
UPDATE documents d
SET status = $2, status_reason = $3, updated_at = clock_timestamp()
WHERE d.document_id = $1 AND d.status <> 'duplicate'
  AND CASE WHEN $4::text IS NULL THEN d.status <> 'embedded'
           ELSE d.stage_rank < ragstream_stage_rank($4) END
RETURNING true
"""

RECORD_STEP = """
INSERT INTO document_events (document_id, stage, input_event_id, attempt, tenant_id, outcome,
                             started_at, finished_at, duration_ms, detail, correlation_id, replay)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (document_id, stage, input_event_id, attempt, replay) DO UPDATE
SET outcome = excluded.outcome, started_at = excluded.started_at,
    finished_at = excluded.finished_at, duration_ms = excluded.duration_ms,
    detail = excluded.detail, correlation_id = excluded.correlation_id,
    recorded_at = clock_timestamp()
"""

GET_DOCUMENT = f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE document_id = $1"
GET_DOCUMENTS = f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE document_id = ANY($1::text[])"
DOCUMENTS_BY_ID_PREFIX = f"""
SELECT {DOCUMENT_COLUMNS} FROM documents
WHERE document_id LIKE replace(replace(replace($1, '\\', '\\\\'), '%', '\\%'), '_', '\\_') || '%'
ORDER BY document_id LIMIT $2
"""
DOCUMENT_BY_CORRELATION = f"""
SELECT {DOCUMENT_COLUMNS} FROM documents WHERE correlation_id = $1
ORDER BY created_at DESC LIMIT 1
"""
STEPS = """
SELECT stage, input_event_id, attempt, outcome, started_at, finished_at, duration_ms, detail,
       correlation_id, replay
FROM document_events WHERE document_id = $1 AND tenant_id = $2
ORDER BY started_at, coalesce(ragstream_stage_rank(stage), 99), attempt, finished_at
"""

# The models and dimensions of a tenant's searchable documents (what search embeds a question
# with), most documents first.
EMBEDDING_MODELS = """
SELECT current_embedding_model AS model, current_embedding_dimensions AS dimensions,
       count(*) AS documents
FROM documents
WHERE tenant_id = $1 AND current_embedding_model IS NOT NULL
  AND current_embedding_dimensions IS NOT NULL AND searchable_chunker_version IS NOT NULL
GROUP BY 1, 2
ORDER BY 3 DESC, 1, 2
"""

# How many candidate rows the tenant has for this model and dimensions, counted up to a limit
# (an index-only scan): below it, search is exact; above it, it goes through the HNSW index.
SEARCH_CANDIDATES = """
SELECT count(*) FROM (
    SELECT 1 FROM embeddings WHERE tenant_id = $1 AND model = $2 AND dimensions = $3 LIMIT $4
) s
"""

# Per approximate search (one transaction): enough candidates for k; iterative scans, so rows the
# joins filter out (other tenants, old versions) are replaced by further candidates; a plan made
# for these values (asyncpg prepares statements and PostgreSQL moves to a generic plan after five
# runs: measured 20x slower); and no sort, so the plan takes the index order. Left to itself the
# planner underestimates what the joins keep (the version columns correlate across tables) and
# may pick "sort every row of the tenant", which is linear in the tenant's size.
ANN_SETTINGS = """
SELECT set_config('hnsw.ef_search', $1, true),
       set_config('hnsw.iterative_scan', 'strict_order', true),
       set_config('plan_cache_mode', 'force_custom_plan', true),
       set_config('enable_sort', 'off', true)
"""


def search_sql(dimensions: int, *, exact: bool = False) -> str:
    """Nearest chunks of one tenant's documents, at their current versions.

    Approximate: the ORDER BY expression and the `dimensions = N` predicate match the partial
    HNSW index `embeddings_hnsw_N`. Exact: the uncast expression, which no index serves, so
    every candidate is measured (for tenants with few rows: exact and fast).
    """
    d = int(dimensions)
    distance = (
        f"e.embedding <=> $2::vector({d})"
        if exact
        else f"e.embedding::vector({d}) <=> $2::vector({d})"
    )
    return f"""
SELECT e.document_id, e.chunk_index, e.chunker_version, d.filename, c.heading_path, c.text,
       c.page, 1 - ({distance}) AS score
FROM embeddings e
JOIN documents d ON d.document_id = e.document_id
JOIN chunks c ON c.document_id = e.document_id AND c.chunker_version = e.chunker_version
             AND c.chunk_index = e.chunk_index
WHERE e.dimensions = {d} AND e.tenant_id = $1 AND e.model = $3
  AND d.tenant_id = $1
  AND d.searchable_chunker_version = e.chunker_version
  AND d.current_embedding_model = e.model AND d.current_embedding_dimensions = {d}
ORDER BY {distance}
LIMIT $4
"""


# The chunks of one tenant's searchable documents (at their current chunker version) matching a
# websearch-syntax query, best first: ts_rank_cd rewards chunks holding more of the terms, and
# closer together. `$2` comes from `ragstream.search.text_query` (the terms or'ed, a hyphenated
# identifier kept as a phrase).
TEXT_SEARCH = """
SELECT c.document_id, c.chunk_index, c.chunker_version, d.filename, c.heading_path, c.text,
       c.page, ts_rank_cd(c.text_search, q) AS score
FROM websearch_to_tsquery('english', $2) q,
     chunks c
JOIN documents d ON d.document_id = c.document_id
WHERE c.text_search @@ q AND c.tenant_id = $1 AND d.tenant_id = $1
  AND d.searchable_chunker_version = c.chunker_version
  AND d.current_embedding_model IS NOT NULL
ORDER BY score DESC, d.filename, c.chunk_index, c.document_id  -- ties: the same order each time
LIMIT $3
"""


SUMMARY = """
SELECT
    (SELECT coalesce(jsonb_object_agg(status, n), '{}'::jsonb) FROM (
        SELECT status, count(*) AS n FROM documents
        WHERE $1::text IS NULL OR tenant_id = $1 GROUP BY status) s) AS by_status,
    (SELECT coalesce(sum(page_count), 0) FROM documents
        WHERE ($1::text IS NULL OR tenant_id = $1) AND status <> 'duplicate') AS pages,
    (SELECT coalesce(sum(chunk_count), 0) FROM documents
        WHERE ($1::text IS NULL OR tenant_id = $1) AND status <> 'duplicate') AS chunks,
    (SELECT count(*) FROM embeddings e JOIN documents d ON d.document_id = e.document_id
        WHERE ($1::text IS NULL OR e.tenant_id = $1)
          AND e.chunker_version = d.searchable_chunker_version
          AND e.model = d.current_embedding_model
          AND e.dimensions = d.current_embedding_dimensions) AS embeddings,
    (SELECT count(*) FROM embedding_cache
        WHERE $1::text IS NULL OR tenant_id = $1) AS cached_embeddings
"""

# Every table carries tenant_id (embedding_cache's is its scope: '' for the shared cache).
ALL_TABLES = (
    "documents",
    "document_events",
    "parse_results",
    "chunks",
    "embeddings",
    "embedding_cache",
)

NATURAL_KEYS = {
    "documents": "document_id",
    "document_events": "document_id, stage, input_event_id, attempt, replay",
    "parse_results": "document_id, content_sha256",
    "chunks": "document_id, chunker_version, chunk_index",
    "embeddings": "document_id, chunker_version, chunk_index, model, dimensions",
    "embedding_cache": "tenant_id, model, dimensions, text_sha256",
}

# Two documents of one tenant with the same content both treated as originals, neither forced.
SAME_CONTENT = """
SELECT count(*) FROM (
    SELECT 1 FROM documents
    WHERE ($1::text IS NULL OR tenant_id = $1)
      AND status NOT IN ('duplicate', 'failed', 'dead-lettered') AND NOT forced
    GROUP BY tenant_id, sha256 HAVING count(*) > 1) g
"""
