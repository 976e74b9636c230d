"""The parse stage (`consumers.parse.parse`) with no broker and no database: the door checks,
duplicates, claim checks, tenants and what it writes, on the in-memory store."""

from __future__ import annotations

from dataclasses import replace

import pytest

from consumers.stage import RecordContext
from ragstream.blobs import BlobStore, sha256_hex
from ragstream.errors import ClaimCheckRefused, InvalidEvent, PermanentError, TenantConflict
from ragstream.events import DocumentParsed
from tests.stages import GUIDE, TENANT, Stages, uploaded


async def test_an_upload_is_registered_parsed_and_moved_to_parsed(stages: Stages) -> None:
    event = uploaded("doc-1")
    outcome = await stages.parse(event)

    parsed = outcome.output
    assert isinstance(parsed, DocumentParsed)
    assert outcome.status == "ok"
    assert (parsed.document_id, parsed.tenant_id, parsed.correlation_id) == (
        "doc-1",
        TENANT,
        "corr-doc-1",
    )
    assert parsed.source_sha256 == event.sha256
    assert parsed.uploaded_at == event.occurred_at
    assert (parsed.parser, parsed.page_count, parsed.title) == ("local", 1, "Operating guide")
    stored = await stages.store.load_parse("doc-1", parsed.content_sha256)
    assert stored is not None
    assert parsed.content_sha256 == sha256_hex(stored.markdown.encode())
    assert parsed.char_count == len(stored.markdown)
    assert "## Dead letters" in stored.markdown
    assert outcome.detail == {"pages": 1, "chars": parsed.char_count, "parser": "local"}

    doc = await stages.store.get_document("doc-1")
    assert doc is not None
    assert (doc.status, doc.current_parse_sha256, doc.page_count) == (
        "parsed",
        parsed.content_sha256,
        1,
    )
    assert (doc.filename, doc.sha256, doc.correlation_id) == (
        "guide.md",
        event.sha256,
        "corr-doc-1",
    )


async def test_a_redelivered_upload_gives_the_same_result_and_writes_nothing_new(
    stages: Stages,
) -> None:
    event = uploaded("doc-1")
    first = await stages.parse(event)
    documents, parses = dict(stages.store.documents), dict(stages.store.parses)
    again = await stages.parse(event)
    assert isinstance(first.output, DocumentParsed) and isinstance(again.output, DocumentParsed)
    assert again.output.content_sha256 == first.output.content_sha256
    assert stages.store.parses == parses
    assert stages.store.documents.keys() == documents.keys()
    assert stages.store.documents["doc-1"].status == "parsed"


async def test_a_duplicate_upload_costs_nothing_and_is_not_even_read(
    stages: Stages, blobs: BlobStore
) -> None:
    await stages.parse(uploaded("doc-1"))
    # The same bytes again, behind a claim check whose blob is not there: registration finds
    # the duplicate before anything is read, so nothing is missed.
    uri = blobs.put(GUIDE, tenant_id=TENANT)
    blobs.locate(uri, TENANT).unlink()
    second = await stages.parse(uploaded("doc-2", source_uri=uri))

    assert (second.output, second.status, second.detail) == (
        None,
        "duplicate",
        {"duplicate_of": "doc-1"},
    )
    doc = stages.store.documents["doc-2"]
    assert (doc.status, doc.duplicate_of) == ("duplicate", "doc-1")
    assert [d for d, _ in stages.store.parses] == ["doc-1"]


async def test_a_forced_duplicate_is_parsed_again(stages: Stages) -> None:
    await stages.parse(uploaded("doc-1"))
    forced = await stages.parse(uploaded("doc-2", force=True))
    assert isinstance(forced.output, DocumentParsed)
    assert stages.store.documents["doc-2"].forced
    assert stages.store.documents["doc-2"].status == "parsed"


async def test_another_tenants_identical_upload_is_no_duplicate(stages: Stages) -> None:
    await stages.parse(uploaded("doc-1"))
    other = await stages.parse(uploaded("doc-2", tenant_id="globex"))
    assert isinstance(other.output, DocumentParsed)


async def test_a_document_id_another_tenant_holds_is_refused_and_changes_nothing(
    stages: Stages,
) -> None:
    await stages.parse(uploaded("doc-1"))
    before = dict(stages.store.documents)
    with pytest.raises(TenantConflict):
        await stages.parse(uploaded("doc-1", tenant_id="globex"))
    assert stages.store.documents == before


async def test_a_claim_check_is_read_from_the_tenants_area_and_verified(
    stages: Stages, blobs: BlobStore
) -> None:
    uri = blobs.put(GUIDE, tenant_id=TENANT)
    outcome = await stages.parse(uploaded("doc-1", source_uri=uri))
    assert isinstance(outcome.output, DocumentParsed)
    assert outcome.output.title == "Operating guide"

    # A blob that is not the bytes the upload names (changed in place) is refused.
    other = b"# Other\n\nnot the guide"
    tampered = blobs.put(b"# Other\n\nnot the GUIDE", sha256_hex(other), tenant_id=TENANT)
    with pytest.raises(PermanentError, match="sha256"):
        await stages.parse(uploaded("doc-2", other, source_uri=tampered))
    assert stages.store.documents["doc-2"].status == "uploaded"
    assert [d for d, _ in stages.store.parses] == ["doc-1"]


async def test_a_claim_check_into_another_tenants_area_is_refused_before_any_write(
    stages: Stages, blobs: BlobStore
) -> None:
    theirs = blobs.put(GUIDE, tenant_id="globex")
    with pytest.raises(ClaimCheckRefused):
        await stages.parse(uploaded("doc-1", source_uri=theirs))
    assert stages.store.documents == {}


async def test_a_record_whose_key_is_not_its_document_id_is_refused_at_the_door(
    stages: Stages,
) -> None:
    wrong_key = RecordContext("uploaded", 0, 0, attempt=1, replay=False, key=b"doc-2")
    with pytest.raises(InvalidEvent, match="record key"):
        await stages.parse(uploaded("doc-1"), wrong_key)
    with pytest.raises(InvalidEvent, match="tenant_id"):
        await stages.parse(uploaded("doc-1", tenant_id="no spaces allowed"))
    assert stages.store.documents == {}


async def test_inline_bytes_that_do_not_match_their_sha256_are_permanent(stages: Stages) -> None:
    forged = replace(uploaded("doc-1", b"# Something else\n\nentirely"), sha256=sha256_hex(GUIDE))
    with pytest.raises(PermanentError, match="does not match its sha256"):
        await stages.parse(forged)
    assert stages.store.parses == {}


async def test_a_corrupt_document_is_permanent_and_leaves_it_uploaded(stages: Stages) -> None:
    event = uploaded(
        "doc-1", b"%PDF-1.7\nnot really a pdf", filename="x.pdf", content_type="application/pdf"
    )
    with pytest.raises(PermanentError):
        await stages.parse(event)
    assert stages.store.documents["doc-1"].status == "uploaded"  # the runtime dead-letters it
    assert stages.store.parses == {}
