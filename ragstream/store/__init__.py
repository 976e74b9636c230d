"""The PostgreSQL + pgvector store: documents, their journey, parse results, chunks, embeddings.

It takes and returns plain values (no event classes). Errors come out as ragstream errors:
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
    ChunkRow,
    Document,
    EmbeddingModel,
    EmbeddingRow,
    Journey,
    ParseResult,
    SearchHit,
    Step,
    Summary,
    UploadDecision,
)
from ragstream.store.postgres import Store, StoreTx

__all__ = [
    "OUTCOMES",
    "SHARED_CACHE",
    "STAGES",
    "STATUSES",
    "ChunkRow",
    "Document",
    "EmbeddingModel",
    "EmbeddingRow",
    "Journey",
    "MigrationError",
    "ParseResult",
    "SearchHit",
    "Step",
    "Store",
    "StoreTx",
    "StoredVersion",
    "Summary",
    "UploadDecision",
    "VersionMove",
    "available_migrations",
    "ensure_vector_index",
    "migrate",
    "versions_per_tenant",
]
