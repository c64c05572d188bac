-- Where a delivery came from: 'webhook' (sent by Labelbox, its signature checked) or
-- 'backfill' (rebuilt from Labelbox's export by `labelhook labelbox backfill`).
ALTER TABLE deliveries ADD COLUMN origin TEXT NOT NULL DEFAULT 'webhook'
    CHECK (origin IN ('webhook', 'backfill'));
-- True when the entity's state was last applied by a backfilled delivery: the gate's rule 7
-- lets a backfill re-apply only its own state (a replay), never one a webhook brought.
ALTER TABLE entities ADD COLUMN backfilled BOOLEAN NOT NULL DEFAULT false;
-- The labels known on a data row, for a backfill to find those deleted while the receiver was
-- down: gated deliveries by project and by the data row their typed event names. The typed
-- event is JSON text written by labelhook; one holding an escaped NUL (which PostgreSQL cannot
-- turn into text) is left out rather than failing the gate that writes it.
CREATE INDEX deliveries_data_rows ON deliveries (project_id,
    (CASE WHEN strpos(event, '\u0000') = 0 THEN event::json ->> 'data_row_id' END))
    WHERE event IS NOT NULL;
