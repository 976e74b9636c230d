-- ragstream store, version 1: documents, their journey, parse results, chunks, embeddings and
-- the embedding cache. Every table carries tenant_id. Rows are keyed by what makes them unique
-- (document, content hash, chunk index, chunker version, embedding model and dimensions), so
-- every write is an idempotent upsert. Older chunker and embedding versions are kept; a
-- document points at its current ones.
--
-- Applied by ragstream.store.migrate inside one transaction, after CREATE EXTENSION vector.

-- The order a document's status moves in. Successes rank by stage; 'duplicate' is terminal.
-- 'failed' and 'dead-lettered' have no rank: they never count as progress.
CREATE FUNCTION ragstream_status_rank(status text) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE status
        WHEN 'uploaded' THEN 1
        WHEN 'parsed'   THEN 2
        WHEN 'chunked'  THEN 3
        WHEN 'embedded' THEN 4
        WHEN 'duplicate' THEN 5
    END::smallint
$$;

-- The rank a stage's success reaches: a failure at stage S counts only while the document has
-- not yet passed S.
CREATE FUNCTION ragstream_stage_rank(stage text) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE stage
        WHEN 'upload' THEN 1
        WHEN 'parse'  THEN 2
        WHEN 'chunk'  THEN 3
        WHEN 'embed'  THEN 4
    END::smallint
$$;

CREATE TABLE documents (
    document_id                  text PRIMARY KEY,
    tenant_id                    text NOT NULL,
    filename                     text,
    content_type                 text,
    size_bytes                   bigint CHECK (size_bytes >= 0),
    sha256                       text NOT NULL,
    source_uri                   text,
    metadata                     jsonb NOT NULL DEFAULT '{}'::jsonb,
    correlation_id               text,
    status                       text NOT NULL CHECK (status IN (
                                     'uploaded', 'parsed', 'chunked', 'embedded',
                                     'duplicate', 'failed', 'dead-lettered')),
    status_reason                text,
    -- Highest success reached in the current generation; failures leave it as it was.
    stage_rank                   smallint NOT NULL DEFAULT 1,
    duplicate_of                 text REFERENCES documents (document_id),
    forced                       boolean NOT NULL DEFAULT false,
    page_count                   integer CHECK (page_count >= 0),
    chunk_count                  integer CHECK (chunk_count >= 0),
    current_parse_sha256         text,
    current_chunker_version      text,
    current_embedding_model      text,
    current_embedding_dimensions integer CHECK (current_embedding_dimensions > 0),
    -- The chunker version whose embeddings search reads: moves only when a document becomes
    -- 'embedded', so re-chunking never takes a document out of search half-way.
    searchable_chunker_version   text,
    uploaded_at                  timestamptz,
    created_at                   timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at                   timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK ((status = 'duplicate') = (duplicate_of IS NOT NULL))
);
CREATE INDEX documents_tenant_sha256 ON documents (tenant_id, sha256);
CREATE INDEX documents_tenant_status ON documents (tenant_id, status);
CREATE INDEX documents_correlation ON documents (correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX documents_duplicate_of ON documents (duplicate_of) WHERE duplicate_of IS NOT NULL;

-- One row per stage step (per attempt), the document's journey. No foreign key: a step is
-- recorded even for a document whose upload never registered (e.g. it was dead-lettered).
CREATE TABLE document_events (
    document_id    text NOT NULL,
    stage          text NOT NULL,
    input_event_id text NOT NULL,
    attempt        integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    tenant_id      text NOT NULL,
    outcome        text NOT NULL CHECK (outcome IN ('ok', 'duplicate', 'failed', 'retry', 'dead-lettered')),
    started_at     timestamptz NOT NULL,
    finished_at    timestamptz NOT NULL,
    duration_ms    double precision NOT NULL,
    detail         jsonb NOT NULL DEFAULT '{}'::jsonb,
    correlation_id text,
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (document_id, stage, input_event_id, attempt)
);
CREATE INDEX document_events_correlation ON document_events (correlation_id)
    WHERE correlation_id IS NOT NULL;
CREATE INDEX document_events_tenant_started ON document_events (tenant_id, started_at);

CREATE TABLE parse_results (
    document_id    text NOT NULL REFERENCES documents (document_id) ON DELETE CASCADE,
    content_sha256 text NOT NULL,
    tenant_id      text NOT NULL,
    parser         text NOT NULL,
    parser_version text NOT NULL,
    markdown       text NOT NULL,
    page_count     integer CHECK (page_count >= 0),
    title          text,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (document_id, content_sha256)
);
CREATE INDEX parse_results_tenant ON parse_results (tenant_id);

CREATE TABLE chunks (
    document_id      text NOT NULL REFERENCES documents (document_id) ON DELETE CASCADE,
    chunker_version  text NOT NULL,
    chunk_index      integer NOT NULL CHECK (chunk_index >= 0),
    tenant_id        text NOT NULL,
    text             text NOT NULL,
    text_sha256      text NOT NULL,
    heading_path     text[] NOT NULL DEFAULT '{}',
    token_count      integer NOT NULL CHECK (token_count >= 0),
    char_start       integer NOT NULL CHECK (char_start >= 0),
    char_end         integer NOT NULL,
    page             integer CHECK (page >= 0),
    chunker_settings jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- The parse result (parse_results.content_sha256) these chunks were cut from.
    parse_sha256     text,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (document_id, chunker_version, chunk_index),
    CHECK (char_end >= char_start)
);
CREATE INDEX chunks_tenant ON chunks (tenant_id);

-- `embedding` is an untyped vector so several models and dimensions live side by side; each
-- dimensions value gets its own partial HNSW expression index (ensure_vector_index).
CREATE TABLE embeddings (
    document_id     text NOT NULL,
    chunker_version text NOT NULL,
    chunk_index     integer NOT NULL,
    model           text NOT NULL,
    dimensions      integer NOT NULL CHECK (dimensions BETWEEN 1 AND 16000),
    tenant_id       text NOT NULL,
    text_sha256     text NOT NULL,
    provider        text NOT NULL,
    embedding       vector NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (document_id, chunker_version, chunk_index, model, dimensions),
    FOREIGN KEY (document_id, chunker_version, chunk_index)
        REFERENCES chunks (document_id, chunker_version, chunk_index) ON DELETE CASCADE,
    CHECK (vector_dims(embedding) = dimensions)
);
-- Per-tenant counts and purges; search counts a tenant's candidates with it (index-only).
CREATE INDEX embeddings_tenant ON embeddings (tenant_id, model, dimensions);

CREATE TABLE embedding_cache (
    model       text NOT NULL,
    dimensions  integer NOT NULL CHECK (dimensions BETWEEN 1 AND 16000),
    text_sha256 text NOT NULL,
    embedding   vector NOT NULL,
    provider    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    hits        bigint NOT NULL DEFAULT 0,
    last_hit_at timestamptz,
    PRIMARY KEY (model, dimensions, text_sha256),
    CHECK (vector_dims(embedding) = dimensions)
)
-- Every cache hit updates `hits`: keep the vector out of line (pgvector stores it EXTERNAL) even
-- for small dimensions, and leave room on each page, so a hit rewrites a small tuple in place
-- (a HOT update, no index churn) instead of the whole vector.
WITH (fillfactor = 80, toast_tuple_target = 128);
