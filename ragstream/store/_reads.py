"""What a retrieval system and operators read: search, a document's journey, summaries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ragstream.errors import ConfigError
from ragstream.store import _sql as sql
from ragstream.store._base import (
    OnConnection,
    atomic,
    check_dimensions,
    check_vector,
    document_from_row,
    remember_tenant,
)
from ragstream.store._errors import translate_errors
from ragstream.store.models import (
    Document,
    EmbeddingModel,
    Journey,
    SearchHit,
    Step,
    Summary,
)

MAX_K = 1000
# A tenant with fewer candidate embeddings (for the model and dimensions) than this is searched
# exactly: every vector measured, perfect recall. Above it, the HNSW index with this ef_search
# (never below 2k). Defaults of `search.exact_limit` and `search.ef_search`: see the README for
# what benchmarks/bench_search.py measured.
EXACT_SEARCH_LIMIT = 2000
EF_SEARCH = 200


MIN_ID_PREFIX = 4
AMBIGUOUS_SHOWN = 5


async def _by_id_prefix(conn: Any, key: str) -> Any:
    """The one document row whose id starts with `key` (None if none or `key` is too short);
    ConfigError listing the candidates when several do."""
    if len(key) < MIN_ID_PREFIX:
        return None
    found = await conn.fetch(sql.DOCUMENTS_BY_ID_PREFIX, key, AMBIGUOUS_SHOWN + 1)
    if len(found) > 1:
        shown = ", ".join(f["document_id"] for f in found[:AMBIGUOUS_SHOWN])
        more = ", ..." if len(found) > AMBIGUOUS_SHOWN else ""
        raise ConfigError(
            f"{key!r} is the start of several document ids ({shown}{more}): give more of it"
        )
    return found[0] if found else None


def _hit(r: Any) -> SearchHit:
    return SearchHit(
        score=float(r["score"]),
        document_id=r["document_id"],
        filename=r["filename"],
        heading_path=list(r["heading_path"]),
        chunk_index=r["chunk_index"],
        text=r["text"],
        page=r["page"],
        chunker_version=r["chunker_version"],
    )


class ReadOperations(OnConnection):
    """Nearest chunks for a query vector, a document's journey, counts."""

    @translate_errors
    async def search(
        self,
        tenant_id: str,
        vector: Sequence[float],
        model: str,
        dimensions: int,
        k: int = 5,
        *,
        ef_search: int = EF_SEARCH,
        exact_limit: int = EXACT_SEARCH_LIMIT,
    ) -> list[SearchHit]:
        """The k chunks nearest to `vector` among the tenant's documents, at their current
        chunker version and embedding model; nearest first.

        A tenant with few embeddings is searched exactly; a larger one through the HNSW index of
        `dimensions`, with iterative scans, so rows filtered out (other tenants, old versions)
        do not leave it short of k results."""
        rows = await self._search_rows(
            tenant_id, vector, model, dimensions, k, None, ef_search, exact_limit
        )
        return [_hit(r) for r in rows]

    @translate_errors
    async def text_search(self, tenant_id: str, query: str, k: int = 5) -> list[SearchHit]:
        """The k chunks of the tenant's searchable documents that best match `query`
        (PostgreSQL websearch syntax), by full-text rank; none when it has no searchable term."""
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be 1..{MAX_K}, got {k}")
        async with self._conn() as conn:
            rows = await conn.fetch(sql.TEXT_SEARCH, tenant_id, query, k)
        return [_hit(r) for r in rows]

    @translate_errors
    async def embedding_models(self, tenant_id: str) -> list[EmbeddingModel]:
        """The models and dimensions the tenant's searchable documents were embedded with, the
        one holding most documents first (a question is embedded with each to search them)."""
        async with self._conn() as conn:
            rows = await conn.fetch(sql.EMBEDDING_MODELS, tenant_id)
        return [EmbeddingModel(r["model"], int(r["dimensions"]), int(r["documents"])) for r in rows]

    @translate_errors
    async def explain_search(
        self,
        tenant_id: str,
        vector: Sequence[float],
        model: str,
        dimensions: int,
        k: int = 5,
        *,
        analyze: bool = False,
        ef_search: int = EF_SEARCH,
        exact_limit: int = EXACT_SEARCH_LIMIT,
    ) -> str:
        """The plan PostgreSQL uses for exactly this search (for operators and tests)."""
        explain = "EXPLAIN (ANALYZE, BUFFERS) " if analyze else "EXPLAIN "
        rows = await self._search_rows(
            tenant_id, vector, model, dimensions, k, explain, ef_search, exact_limit
        )
        return "\n".join(r[0] for r in rows)

    async def _search_rows(
        self,
        tenant_id: str,
        vector: Sequence[float],
        model: str,
        dimensions: int,
        k: int,
        explain: str | None,
        ef_search: int,
        exact_limit: int,
    ) -> list[Any]:
        query = check_vector(vector, check_dimensions(dimensions), "query")
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be 1..{MAX_K}, got {k}")
        async with self._conn() as conn, atomic(conn):
            candidates = await conn.fetchval(
                sql.SEARCH_CANDIDATES, tenant_id, model, dimensions, exact_limit
            )
            exact = candidates < exact_limit
            if not exact:
                await conn.execute(sql.ANN_SETTINGS, str(min(1000, max(ef_search, 2 * k))))
            statement = (explain or "") + sql.search_sql(dimensions, exact=exact)
            return list(await conn.fetch(statement, tenant_id, query, model, k))

    @translate_errors
    async def get_document(self, document_id: str) -> Document | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(sql.GET_DOCUMENT, document_id)
            if row is not None:
                remember_tenant(conn, document_id, row["tenant_id"])
        return None if row is None else document_from_row(row)

    @translate_errors
    async def get_documents(self, document_ids: Sequence[str]) -> dict[str, Document]:
        """Many documents in one query, by id; ids not registered are left out."""
        async with self._conn() as conn:
            rows = await conn.fetch(sql.GET_DOCUMENTS, list(document_ids))
        found = [document_from_row(row) for row in rows]
        return {doc.document_id: doc for doc in found}

    # -- parse --------------------------------------------------------------------------------

    @translate_errors
    async def journey(self, document_id_or_correlation_id: str) -> Journey | None:
        """A document and its steps in order, by document id, correlation id, or the start of
        a document id (at least 4 characters, as the tables show it) that only one has."""
        key = document_id_or_correlation_id
        async with self._conn() as conn:
            row = await conn.fetchrow(sql.GET_DOCUMENT, key)
            if row is None:
                row = await conn.fetchrow(sql.DOCUMENT_BY_CORRELATION, key)
            if row is None:
                row = await _by_id_prefix(conn, key)
            if row is None:
                return None
            # Only the owner's steps: a record of another tenant naming this id never shows.
            steps = await conn.fetch(sql.STEPS, row["document_id"], row["tenant_id"])
        return Journey(document=document_from_row(row), steps=[Step(**dict(s)) for s in steps])

    @translate_errors
    async def document_id(self, key: str) -> str | None:
        """The id of the document whose id is `key`, or starts with it (at least 4
        characters, as the tables show ids) and is the only one that does; None if none.
        An ambiguous start is a ConfigError naming the candidates."""
        async with self._conn() as conn:
            row = await conn.fetchrow(sql.GET_DOCUMENT, key)
            if row is None:
                row = await _by_id_prefix(conn, key)
        return None if row is None else str(row["document_id"])

    @translate_errors
    async def summary(self, tenant_id: str | None = None) -> Summary:
        """Documents by status, pages, chunks, searchable embeddings, duplicates (one tenant or all)."""
        async with self._conn() as conn:
            row = await conn.fetchrow(sql.SUMMARY, tenant_id)
        by_status = {str(k): int(v) for k, v in row["by_status"].items()}
        return Summary(
            documents=sum(by_status.values()),
            by_status=by_status,
            pages=int(row["pages"]),
            chunks=int(row["chunks"]),
            embeddings=int(row["embeddings"]),
            duplicates=by_status.get("duplicate", 0),
            cached_embeddings=int(row["cached_embeddings"]),
        )

    @translate_errors
    async def count_rows(self, tenant_id: str | None = None) -> dict[str, int]:
        """Rows per table, one tenant's or all (embedding_cache: the tenant's cache scope)."""
        where = "" if tenant_id is None else " WHERE tenant_id = $1"
        args = () if tenant_id is None else (tenant_id,)
        async with self._conn() as conn:
            return {
                t: int(await conn.fetchval(f"SELECT count(*) FROM {t}{where}", *args))
                for t in sql.ALL_TABLES
            }

    @translate_errors
    async def duplicate_rows(self, tenant_id: str | None = None) -> dict[str, int]:
        """Natural keys held by more than one row, per table (all zero in a healthy store), and
        `documents_same_content`: a tenant's content held by two originals, neither forced."""
        where = "" if tenant_id is None else " WHERE tenant_id = $1"
        args = () if tenant_id is None else (tenant_id,)
        out: dict[str, int] = {}
        async with self._conn() as conn:
            for t in sql.ALL_TABLES:
                key = sql.NATURAL_KEYS[t]
                query = f"SELECT count(*) FROM (SELECT 1 FROM {t}{where} GROUP BY {key} HAVING count(*) > 1) g"
                out[t] = int(await conn.fetchval(query, *args))
            out["documents_same_content"] = int(await conn.fetchval(sql.SAME_CONTENT, tenant_id))
        return out
