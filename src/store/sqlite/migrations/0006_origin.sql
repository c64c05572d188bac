-- Where a delivery came from: 'webhook' (sent by Labelbox, its signature checked) or
-- 'backfill' (rebuilt from Labelbox's export by `labelhook labelbox backfill`).
ALTER TABLE deliveries ADD COLUMN origin TEXT NOT NULL DEFAULT 'webhook';
-- 1 when the entity's state was last applied by a backfilled delivery: the gate's rule 7 lets
-- a backfill re-apply only its own state (a replay), never one a webhook brought.
ALTER TABLE entities ADD COLUMN backfilled INTEGER NOT NULL DEFAULT 0;
-- The labels known on a data row, for a backfill to find those deleted while the receiver was
-- down: gated deliveries by project and by the data row their typed event names.
CREATE INDEX deliveries_data_rows ON deliveries (project_id, json_extract(event, '$.data_row_id'))
    WHERE event IS NOT NULL;
