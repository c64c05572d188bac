-- Deliveries written once: a delivery's row is what was received, and nothing in it changes
-- through its life (but for retention dropping its body). What moves goes to small rows of
-- their own:
--   delivery_status  one row per delivery: its status, which `events list` and the console
--                    filter and count on;
--   verdicts         what the gate made of it, written once per gating;
--   queue            one row per delivery with work left (not gated yet, heading or waiting in
--                    its entity's lane, a retry coming due) with its lease; deleted when done.
-- Existing rows are moved over in place: statuses, verdicts, lanes, leases and pending runs are
-- kept as they are, so pending work stays pending and in order.

CREATE TABLE delivery_status (
    seq     BIGINT PRIMARY KEY,
    status  TEXT   NOT NULL
        CHECK (status IN ('pending', 'delivered', 'stale', 'dead', 'unrecognized'))
);
INSERT INTO delivery_status (seq, status) SELECT seq, status FROM deliveries;
-- The dead-letter page, `events list --status` and `events replay --status`.
CREATE INDEX delivery_status_status ON delivery_status (status, seq);

-- What the gate decided. `fresh` and `lane_pos` are NULL once a replay sent the delivery back
-- to the gate (its entity and version stay, for the console), until it is gated again.
CREATE TABLE verdicts (
    seq          BIGINT  PRIMARY KEY,
    entity       TEXT,
    version      BIGINT,
    change       TEXT,
    project_id   TEXT,
    fresh        BOOLEAN,
    lane_pos     BIGINT,
    parse_error  TEXT,
    event        TEXT
);
INSERT INTO verdicts (seq, entity, version, change, project_id, fresh, lane_pos, parse_error,
                      event)
SELECT seq, entity, version, change, project_id, fresh, lane_pos, parse_error, event
FROM deliveries
WHERE gated OR entity IS NOT NULL OR parse_error IS NOT NULL OR event IS NOT NULL;

-- Work left, one small row per delivery, deleted when nothing is left to do. Its leases are
-- rewritten often; they are in no index, so those updates stay on their page (HOT) where the
-- fill factor leaves room.
CREATE TABLE queue (
    seq          BIGINT  PRIMARY KEY,
    received_at  BIGINT  NOT NULL,
    -- False until a dispatcher has gated it.
    gated        BOOLEAN NOT NULL DEFAULT false,
    entity       TEXT,
    lane_pos     BIGINT,
    -- Queued behind an earlier delivery of its entity: not due until promoted.
    waiting      BOOLEAN NOT NULL DEFAULT false,
    -- When its next handler run is due; NULL while waiting.
    due_at       BIGINT,
    -- Reserved for one dispatcher (to gate it, or to run its handlers) until lease_until.
    lease_owner  TEXT,
    lease_until  BIGINT
) WITH (fillfactor = 70);
INSERT INTO queue (seq, received_at, gated, entity, lane_pos, waiting, due_at, lease_owner,
                   lease_until)
SELECT seq, received_at, gated, CASE WHEN gated THEN entity END,
       CASE WHEN gated THEN lane_pos END, waiting, due_at,
       CASE WHEN gated THEN lease_owner ELSE gate_owner END,
       CASE WHEN gated THEN lease_until ELSE gate_until END
FROM deliveries
WHERE NOT gated OR due_at IS NOT NULL OR waiting;
CREATE INDEX queue_ungated ON queue (seq) WHERE NOT gated;
CREATE INDEX queue_due ON queue (due_at, seq) WHERE due_at IS NOT NULL;
CREATE INDEX queue_waiting ON queue (entity, lane_pos) WHERE waiting;

-- Handler runs and attempts are written in batches beside the delivery, never through it: a
-- foreign key would lock the delivery's row (and so write to its page) at every insert.
-- Retention deletes them with their delivery.
ALTER TABLE handler_runs DROP CONSTRAINT IF EXISTS handler_runs_delivery_seq_fkey;
ALTER TABLE attempts DROP CONSTRAINT IF EXISTS attempts_delivery_seq_fkey;
ALTER TABLE handler_runs SET (fillfactor = 80);

-- The indexes that served the rewrites of delivery rows, and the columns they rewrote.
DROP INDEX deliveries_ungated;
DROP INDEX deliveries_due;
DROP INDEX deliveries_waiting;
DROP INDEX deliveries_status;
ALTER TABLE deliveries
    DROP COLUMN status,
    DROP COLUMN gated,
    DROP COLUMN gate_owner,
    DROP COLUMN gate_until,
    DROP COLUMN entity,
    DROP COLUMN version,
    DROP COLUMN change,
    DROP COLUMN project_id,
    DROP COLUMN fresh,
    DROP COLUMN lane_pos,
    DROP COLUMN waiting,
    DROP COLUMN parse_error,
    DROP COLUMN due_at,
    DROP COLUMN lease_owner,
    DROP COLUMN lease_until,
    DROP COLUMN event;
