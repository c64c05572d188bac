-- The labels known on a data row, for a backfill to find those deleted while the receiver was
-- down: verdicts by project and by the data row their typed event names (the index 0007 made
-- on deliveries went with the columns 0010 moved to verdicts). The typed event is JSON text
-- written by labelhook; one holding an escaped NUL (which PostgreSQL cannot turn into text) is
-- left out rather than failing the gate that writes it.
CREATE INDEX verdicts_data_rows ON verdicts (project_id,
    (CASE WHEN strpos(event, '\u0000') = 0 THEN event::json ->> 'data_row_id' END))
    WHERE event IS NOT NULL;

-- The small rows that move with every delivery (its place in the queue, its status, its
-- handler runs, its entity's state) leave dead versions behind at the rate deliveries come. By
-- default autovacuum waits for a fifth of a table to be dead, and under load the queue's few
-- thousand live rows were soon outnumbered tens of times, every claim reading past them: vacuum
-- these after a fixed number of changes, and without the cost-based pauses.
ALTER TABLE queue SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE delivery_status SET (autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE handler_runs SET (autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE entities SET (autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0);
