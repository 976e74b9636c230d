"""Backup and restore of a ragstream stack (`ragstream backup DIR`, `ragstream restore DIR`).

A backup directory holds:

    manifest.json          every other file with its sha256 and size; the ragstream version,
                           when, the topics' first and end offsets, rows per table (written last)
    postgres.dump          pg_dump, custom format: documents, chunks, embeddings, the cost
                           ledger, budgets set at runtime, migrations
    offsets.json           every consumer group of the flow: state, members, committed offsets
    control.json           the control topic's current state (latest record per key)
    blobs/tenants/...      copies of the blob store's files
    blobs-elsewhere.json   claim checks that point outside the blob store (not copied)
"""

from ragstream.backup.manifest import BackupDamaged
from ragstream.backup.run import BackupReport, RestoreReport, restore_backup, take_backup
from ragstream.backup.streams import RestoreRefused

__all__ = [
    "BackupDamaged",
    "BackupReport",
    "RestoreRefused",
    "RestoreReport",
    "restore_backup",
    "take_backup",
]
