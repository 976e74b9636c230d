-- ragstream store, version 5: the embedding cache is scoped per tenant.
--
-- A shared cache tells a tenant whose chunk text is found there that some other tenant has
-- embedded the same text. Each cache row now belongs to a scope: a tenant id, or '' for the
-- cache every tenant shares (only with `embed.share_cache_across_tenants`). The embed stage
-- reads and writes only its own scope.
--
-- Rows cached before this version were shared: they keep the '' scope. Each tenant's scope is
-- filled from that tenant's own embeddings (vectors it already holds, so nothing crosses
-- tenants), so replays after the upgrade still cost no embedding calls. This reads the whole
-- embeddings table once, inside the migration's transaction.

ALTER TABLE embedding_cache ADD COLUMN tenant_id text NOT NULL DEFAULT '';
ALTER TABLE embedding_cache
    DROP CONSTRAINT embedding_cache_pkey,
    ADD PRIMARY KEY (tenant_id, model, dimensions, text_sha256);
-- Every write names its scope.
ALTER TABLE embedding_cache ALTER COLUMN tenant_id DROP DEFAULT;

INSERT INTO embedding_cache (tenant_id, model, dimensions, text_sha256, embedding, provider,
                             created_at)
SELECT DISTINCT ON (tenant_id, model, dimensions, text_sha256)
       tenant_id, model, dimensions, text_sha256, embedding, provider, created_at
FROM embeddings
WHERE tenant_id <> ''
ORDER BY tenant_id, model, dimensions, text_sha256, created_at DESC
ON CONFLICT (tenant_id, model, dimensions, text_sha256) DO NOTHING;
