-- A delivery is written once, as it arrived; what happens to it afterwards is appended beside
-- it: the gate's verdict, each attempt, the closing of its work, a replay. No row is rewritten
-- through its life, so the indexes that served those rewrites (ungated, due, waiting, status,
-- unpruned bodies) go. Where a delivery stands is read off its records (the view
-- `deliveries_now`); which lanes have work and what is due is kept in the serving process's
-- memory, rebuilt from these records at start. Existing rows are carried over as they stood.

CREATE TABLE deliveries_log (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id  TEXT    NOT NULL,
    body_sha256  BLOB    NOT NULL,
    id_conflict  INTEGER NOT NULL,
    endpoint     TEXT    NOT NULL,
    topic        TEXT,
    client_ip    TEXT    NOT NULL,
    headers      TEXT    NOT NULL,              -- JSON [[name, value], ...], signatures redacted
    blob_name    TEXT,                          -- large bodies: a file in the blob directory
    body_len     INTEGER NOT NULL,
    received_at  INTEGER NOT NULL,              -- unix milliseconds
    accepted_as  TEXT    NOT NULL,              -- pending, or unrecognized (unknown topic)
    request_id   TEXT,
    -- 'webhook' (sent by Labelbox, its signature checked) or 'backfill' (rebuilt from
    -- Labelbox's export by `labelhook labelbox backfill`).
    origin       TEXT    NOT NULL DEFAULT 'webhook',
    UNIQUE (delivery_id, body_sha256)
);

-- The gate's decision, one per delivery and round (a replay starts a new round). `id` is the
-- gate's order, which is the order of an entity's lane.
CREATE TABLE verdicts (
    id           INTEGER PRIMARY KEY,
    seq          INTEGER NOT NULL,
    round        INTEGER NOT NULL,
    entity       TEXT,
    version      INTEGER,                       -- unix nanoseconds
    change       TEXT    NOT NULL,
    project_id   TEXT,
    fresh        INTEGER NOT NULL,
    parse_error  TEXT,
    handlers     TEXT    NOT NULL,              -- JSON array: the handlers its routes chose
    status       TEXT    NOT NULL,              -- as the gate left it
    gated_at     INTEGER NOT NULL,
    -- A label or workflow event's data row, and for a label event the labels it says that data
    -- row has (JSON array): what a backfill compares the export with, to find deleted labels.
    data_row_id  TEXT,
    labels       TEXT
);
CREATE INDEX verdicts_seq ON verdicts (seq);
CREATE INDEX verdicts_data_rows ON verdicts (project_id, data_row_id)
    WHERE data_row_id IS NOT NULL;
-- The statuses an operator looks for, found without reading every verdict.
CREATE INDEX verdicts_notable ON verdicts (status, seq) WHERE status IN ('stale', 'unrecognized');

-- Every call of a handler, in the round it was made in.
CREATE TABLE attempts_log (
    delivery_seq INTEGER NOT NULL,
    round        INTEGER NOT NULL,
    handler      TEXT    NOT NULL,
    attempt      INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER NOT NULL,
    outcome      TEXT    NOT NULL,              -- ok|retry|dead
    error        TEXT,
    next_at      INTEGER                        -- a retry: when it is due
);
CREATE INDEX attempts_log_delivery ON attempts_log (delivery_seq);

-- A delivery's work finished in a round: the status it ended with (delivered, dead, or stale and
-- unrecognized ones handed on anyway).
CREATE TABLE closings (
    seq          INTEGER NOT NULL,
    round        INTEGER NOT NULL,
    status       TEXT    NOT NULL,
    at           INTEGER NOT NULL,
    PRIMARY KEY (seq, round)
) WITHOUT ROWID;
CREATE INDEX closings_notable ON closings (status, seq) WHERE status <> 'delivered';

-- A delivery put back before the gate; `status` is what it shows until it is gated again.
CREATE TABLE replays (
    id           INTEGER PRIMARY KEY,
    seq          INTEGER NOT NULL,
    round        INTEGER NOT NULL,
    status       TEXT    NOT NULL,
    at           INTEGER NOT NULL
);
CREATE INDEX replays_seq ON replays (seq);

-- Deliveries whose body retention dropped (their rows are kept a while longer).
CREATE TABLE pruned_bodies (seq INTEGER PRIMARY KEY);

-- Where the serving process reads from at start: every delivery below `low_water` is finished.
CREATE TABLE dispatch_mark (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    low_water    INTEGER NOT NULL
);

-- The old rows, carried over.
INSERT INTO deliveries_log (seq, delivery_id, body_sha256, id_conflict, endpoint, topic,
        client_ip, headers, blob_name, body_len, received_at, accepted_as, request_id)
    SELECT seq, delivery_id, body_sha256, id_conflict, endpoint, topic, client_ip, headers,
           blob_name, body_len, received_at,
           CASE WHEN status = 'unrecognized' AND gated = 0 THEN 'unrecognized' ELSE 'pending' END,
           request_id
    FROM deliveries;
UPDATE sqlite_sequence SET seq = (SELECT COALESCE(MAX(seq), 0) FROM deliveries)
    WHERE name = 'deliveries_log';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'deliveries_log', COALESCE(MAX(seq), 0) FROM deliveries
    WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'deliveries_log');

INSERT INTO verdicts (seq, round, entity, version, change, project_id, fresh, parse_error,
        handlers, status, gated_at, data_row_id, labels)
    SELECT d.seq, 0, d.entity, d.version, COALESCE(d.change, 'updated'), d.project_id,
           COALESCE(d.fresh, 1), d.parse_error,
           COALESCE((SELECT json_group_array(h.handler) FROM handler_runs h
                     WHERE h.delivery_seq = d.seq), '[]'),
           CASE WHEN d.status IN ('delivered', 'dead') AND EXISTS (
                    SELECT 1 FROM handler_runs h WHERE h.delivery_seq = d.seq)
                THEN 'pending' ELSE d.status END,
           d.received_at,
           json_extract(d.event, '$.data_row_id'),
           -- The labels a label event names: a v1 label its own (none once deleted), an
           -- export-shaped snapshot every label it lists.
           CASE WHEN d.entity LIKE 'labels:%' THEN json_extract(d.event, '$.label_ids')
                WHEN d.entity LIKE 'label:%' AND d.change <> 'deleted'
                    THEN json_array(json_extract(d.event, '$.label_id'))
                WHEN d.entity LIKE 'label:%' THEN '[]' END
    FROM deliveries d WHERE d.gated = 1 ORDER BY d.entity, d.lane_pos, d.seq;

INSERT INTO attempts_log (delivery_seq, round, handler, attempt, started_at, finished_at,
        outcome, error, next_at)
    SELECT a.delivery_seq, 0, a.handler, a.attempt, a.started_at, a.finished_at, a.outcome,
           a.error, CASE WHEN a.outcome = 'retry' THEN h.next_at END
    FROM attempts a
    LEFT JOIN handler_runs h ON h.delivery_seq = a.delivery_seq AND h.handler = a.handler
    ORDER BY a.delivery_seq, a.started_at;

-- Gated deliveries whose runs are all over, closed with the status they have.
INSERT INTO closings (seq, round, status, at)
    SELECT d.seq, 0, d.status, d.received_at FROM deliveries d
    WHERE d.gated = 1 AND EXISTS (SELECT 1 FROM handler_runs h WHERE h.delivery_seq = d.seq)
      AND NOT EXISTS (SELECT 1 FROM handler_runs h
                      WHERE h.delivery_seq = d.seq AND h.state = 'pending');

-- Deliveries put back before the gate after handlers had run: a replay, so that the runs that
-- were done stay done.
INSERT INTO replays (seq, round, status, at)
    SELECT d.seq, 1, d.status, d.received_at FROM deliveries d
    WHERE d.gated = 0 AND EXISTS (SELECT 1 FROM handler_runs h WHERE h.delivery_seq = d.seq);

INSERT INTO pruned_bodies (seq) SELECT seq FROM deliveries WHERE body_pruned = 1;

INSERT INTO dispatch_mark (id, low_water)
    SELECT 1, COALESCE(MIN(seq), (SELECT COALESCE(MAX(seq), 0) + 1 FROM deliveries))
    FROM deliveries
    WHERE gated = 0 OR due_at IS NOT NULL OR waiting = 1 OR status = 'pending';

-- The entities keep only what the gate applied; lanes are the serving process's.
CREATE TABLE entities_log (
    entity       TEXT    PRIMARY KEY,
    version      INTEGER,
    change       TEXT    NOT NULL,
    updated_at   INTEGER NOT NULL,
    -- 1 when the state was applied by a backfilled delivery: the gate's rule 7 lets a backfill
    -- apply again only its own state (a replay), never one a webhook brought.
    backfilled   INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
INSERT INTO entities_log (entity, version, change, updated_at)
    SELECT entity, version, change, updated_at FROM entities;

-- Small bodies without the reference to the old table (rows and bodies go in ranges).
CREATE TABLE bodies_log (
    seq  INTEGER PRIMARY KEY,
    body BLOB    NOT NULL
);
INSERT INTO bodies_log (seq, body) SELECT seq, body FROM bodies;

DROP TABLE attempts;
DROP TABLE handler_runs;
DROP TABLE bodies;
DROP TABLE entities;
DROP TABLE deliveries;
ALTER TABLE deliveries_log RENAME TO deliveries;
ALTER TABLE attempts_log RENAME TO attempts;
ALTER TABLE entities_log RENAME TO entities;
ALTER TABLE bodies_log RENAME TO bodies;
DROP INDEX IF EXISTS attempts_log_delivery;
CREATE INDEX attempts_delivery ON attempts (delivery_seq);

-- A delivery as it stands now, with the columns the old table had: its current round (its
-- latest replay's, else 0), the verdict of that round (the entity and version of its latest
-- verdict even before it is gated again), and its status from the newest record that says one.
CREATE VIEW deliveries_now AS
SELECT d.seq, d.delivery_id, d.body_sha256, d.id_conflict, d.endpoint, d.topic, d.client_ip,
       d.headers, d.blob_name, d.body_len, d.received_at, d.request_id, d.origin,
       v.entity, v.version, v.change, v.project_id, v.parse_error, v.handlers,
       COALESCE(r.round, 0) AS round,
       CASE WHEN v.round = COALESCE(r.round, 0) THEN v.fresh END AS fresh,
       CASE WHEN v.round = COALESCE(r.round, 0) THEN v.id END AS lane_pos,
       COALESCE(v.round = COALESCE(r.round, 0), 0) AS gated,
       CASE WHEN c.status IS NOT NULL THEN c.status
            WHEN v.round = COALESCE(r.round, 0) THEN v.status
            WHEN r.status IS NOT NULL THEN r.status
            ELSE d.accepted_as END AS status,
       -- Nothing left to do: closed, or gated with no handler to run (a gate that leaves runs
       -- but none to run now, all done in an earlier round, closes the delivery itself).
       COALESCE(c.status IS NOT NULL
                OR (v.round = COALESCE(r.round, 0) AND v.handlers = '[]'), 0) AS finished,
       EXISTS (SELECT 1 FROM pruned_bodies p WHERE p.seq = d.seq) AS body_pruned
FROM deliveries d
LEFT JOIN replays r ON r.id = (SELECT MAX(id) FROM replays WHERE seq = d.seq)
LEFT JOIN verdicts v ON v.id = (SELECT MAX(id) FROM verdicts WHERE seq = d.seq)
LEFT JOIN closings c ON c.seq = d.seq AND c.round = COALESCE(r.round, 0);
