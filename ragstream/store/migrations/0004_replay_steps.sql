-- ragstream store, version 4: a replayed record is a step of its own in a document's journey.
--
-- `ragstream replay --live` writes copies of input records back to their topic with the
-- `ragstream.replay` header. A copy carries the same event (same event id) as the record it
-- copies, so without more to the key its step would overwrite the first one. `replay` is empty
-- for a record as it was first published and, for a replayed copy, the copy's position
-- (`topic:partition:offset`): each replay gets its own row, and a redelivered copy (or the
-- original) still updates the one row it already has.

ALTER TABLE document_events ADD COLUMN replay text NOT NULL DEFAULT '';
ALTER TABLE document_events
    DROP CONSTRAINT document_events_pkey,
    ADD PRIMARY KEY (document_id, stage, input_event_id, attempt, replay);
