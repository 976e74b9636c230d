"""The PostgreSQL + pgvector store: documents, their journey, parse results, chunks, embeddings.

It takes and returns plain values (no event classes): each write of a stage takes one record of
`ragstream.store.models` (Upload, ParsedContent, ChunkSet, EmbeddingSet, StatusChange), so a
batch of documents is a list of them. Errors come out as ragstream errors:
RetryableError (connection lost, serialization failure, deadlock, timeout), PermanentError (bad
data), ConfigError (bad credentials, unknown database, a changed migration).
"""

from ragstream.store._prune import StoredVersion, versions_per_tenant
from ragstream.store._versions import VersionMove
from ragstream.store.migrate import (
    MigrationError,
    available_migrations,
    ensure_vector_index,
    migrate,
)
from ragstream.store.models import (
    OUTCOMES,
    SHARED_CACHE,
    STAGES,
    STATUSES,
    CacheLookup,
    ChunkRow,
    ChunkSet,
    Document,
    EmbeddingModel,
    EmbeddingRow,
    EmbeddingSet,
    Journey,
    ParsedContent,
    ParseResult,
    SearchHit,
    StatusChange,
    Step,
    Summary,
    Upload,
    UploadDecision,
)
from ragstream.store.postgres import Store, StoreTx

__all__ = [
    "OUTCOMES",
    "SHARED_CACHE",
    "STAGES",
    "STATUSES",
    "CacheLookup",
    "ChunkRow",
    "ChunkSet",
    "Document",
    "EmbeddingModel",
    "EmbeddingRow",
    "EmbeddingSet",
    "Journey",
    "MigrationError",
    "ParseResult",
    "ParsedContent",
    "SearchHit",
    "StatusChange",
    "Step",
    "Store",
    "StoreTx",
    "StoredVersion",
    "Summary",
    "Upload",
    "UploadDecision",
    "VersionMove",
    "available_migrations",
    "ensure_vector_index",
    "migrate",
    "versions_per_tenant",
]
