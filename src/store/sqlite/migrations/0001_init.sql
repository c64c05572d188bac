-- Deliveries as received, with their dispatch state.
CREATE TABLE deliveries (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id  TEXT    NOT NULL,
    body_sha256  BLOB    NOT NULL,
    -- 1 when the same delivery id was stored before with another body.
    id_conflict  INTEGER NOT NULL DEFAULT 0,
    endpoint     TEXT    NOT NULL,
    topic        TEXT,
    client_ip    TEXT    NOT NULL,
    headers      TEXT    NOT NULL,              -- JSON [[name, value], ...], signatures redacted
    blob_name    TEXT,                          -- large bodies: a file in the blob directory
    body_len     INTEGER NOT NULL,
    received_at  INTEGER NOT NULL,              -- unix milliseconds
    status       TEXT    NOT NULL,              -- pending|delivered|stale|dead|unrecognized
    -- Filled when the dispatcher parses and gates the delivery.
    gated        INTEGER NOT NULL DEFAULT 0,
    entity       TEXT,
    version      INTEGER,                       -- unix nanoseconds
    change       TEXT,
    project_id   TEXT,
    fresh        INTEGER,
    lane_pos     INTEGER,                       -- order within the entity's lane
    -- 1 while queued behind an earlier delivery of the same entity (not due until promoted).
    waiting      INTEGER NOT NULL DEFAULT 0,
    parse_error  TEXT,
    -- Dispatch queue: set when the gate selected handlers, NULL once nothing is left to do.
    due_at       INTEGER,
    lease_owner  TEXT,
    lease_until  INTEGER,
    UNIQUE (delivery_id, body_sha256)
);
-- The dispatcher's three questions, each answered from a small partial index: what is not
-- gated yet, what is due (only the head of each entity's lane ever is), and what waits next
-- in a lane.
CREATE INDEX deliveries_ungated ON deliveries (seq) WHERE gated = 0;
CREATE INDEX deliveries_due ON deliveries (due_at, seq) WHERE due_at IS NOT NULL;
CREATE INDEX deliveries_waiting ON deliveries (entity, lane_pos) WHERE waiting = 1;
CREATE INDEX deliveries_status ON deliveries (status, seq);

-- Small bodies, apart from the rows the dispatcher updates several times: SQLite rewrites a
-- whole row on UPDATE, and the body is most of it.
CREATE TABLE bodies (
    seq  INTEGER PRIMARY KEY REFERENCES deliveries (seq),
    body BLOB    NOT NULL
);

-- One row per (delivery, handler) that a route selected.
CREATE TABLE handler_runs (
    delivery_seq INTEGER NOT NULL REFERENCES deliveries (seq),
    handler      TEXT    NOT NULL,
    state        TEXT    NOT NULL,              -- pending|done|dead
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      INTEGER,
    last_error   TEXT,
    PRIMARY KEY (delivery_seq, handler)
);

-- Every call of a handler, for `events show`.
CREATE TABLE attempts (
    delivery_seq INTEGER NOT NULL REFERENCES deliveries (seq),
    handler      TEXT    NOT NULL,
    attempt      INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER NOT NULL,
    outcome      TEXT    NOT NULL,              -- ok|retry|dead|permanent
    error        TEXT
);
CREATE INDEX attempts_delivery ON attempts (delivery_seq);

-- The ordering gate's memory: the last applied version per entity.
CREATE TABLE entities (
    entity       TEXT    PRIMARY KEY,
    version      INTEGER,
    change       TEXT    NOT NULL,
    lane_next    INTEGER NOT NULL,
    -- lane_pos of the delivery at the head of the lane (being handled or waiting for a
    -- retry); NULL when nothing of this entity has work left.
    active_pos   INTEGER,
    updated_at   INTEGER NOT NULL
);

-- /readyz writes here to prove the store takes commits.
CREATE TABLE probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at INTEGER NOT NULL
);
INSERT INTO probe (id, at) VALUES (1, 0);
