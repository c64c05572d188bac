-- labelhook on PostgreSQL: the same model as the SQLite back-end, shared by several replicas.
-- Times are Unix milliseconds from the replicas' clocks; versions are Unix nanoseconds.

-- Large bodies, written in chunks while they stream in, before their delivery row exists.
CREATE TABLE blobs (
    id          BIGSERIAL PRIMARY KEY,
    len         BIGINT  NOT NULL DEFAULT 0,
    created_at  BIGINT  NOT NULL
);

CREATE TABLE blob_chunks (
    blob_id  BIGINT  NOT NULL REFERENCES blobs (id) ON DELETE CASCADE,
    idx      INTEGER NOT NULL,
    data     BYTEA   NOT NULL,
    PRIMARY KEY (blob_id, idx)
);

-- Deliveries as received, with their dispatch state.
CREATE TABLE deliveries (
    seq          BIGSERIAL PRIMARY KEY,
    delivery_id  TEXT    NOT NULL,
    body_sha256  BYTEA   NOT NULL,
    -- True when the same delivery id was stored before with another body.
    id_conflict  BOOLEAN NOT NULL DEFAULT false,
    endpoint     TEXT    NOT NULL,
    topic        TEXT,
    client_ip    TEXT    NOT NULL,
    headers      TEXT    NOT NULL,              -- JSON [[name, value], ...], signatures redacted
    body         BYTEA,                         -- small bodies; NULL when blob_id is set
    blob_id      BIGINT  REFERENCES blobs (id),
    body_len     BIGINT  NOT NULL,
    received_at  BIGINT  NOT NULL,
    status       TEXT    NOT NULL
        CHECK (status IN ('pending', 'delivered', 'stale', 'dead', 'unrecognized')),
    -- Filled when a dispatcher parses and gates the delivery.
    gated        BOOLEAN NOT NULL DEFAULT false,
    -- Reserved for gating by one dispatcher until gate_until.
    gate_owner   TEXT,
    gate_until   BIGINT,
    entity       TEXT,
    version      BIGINT,
    change       TEXT,
    project_id   TEXT,
    fresh        BOOLEAN,
    lane_pos     BIGINT,                        -- order within the entity's lane
    -- True while queued behind an earlier delivery of the same entity (not due until promoted).
    waiting      BOOLEAN NOT NULL DEFAULT false,
    parse_error  TEXT,
    -- Dispatch queue: set when the gate selected handlers, NULL once nothing is left to do.
    due_at       BIGINT,
    lease_owner  TEXT,
    lease_until  BIGINT,
    UNIQUE (delivery_id, body_sha256)
);
-- The dispatchers' questions, each answered from a small partial index: what is not gated
-- yet, what is due (only the head of each entity's lane ever is), and what waits next in a lane.
CREATE INDEX deliveries_ungated ON deliveries (seq) WHERE NOT gated;
CREATE INDEX deliveries_due ON deliveries (due_at, seq) WHERE due_at IS NOT NULL;
CREATE INDEX deliveries_waiting ON deliveries (entity, lane_pos) WHERE waiting;
CREATE INDEX deliveries_status ON deliveries (status, seq);
CREATE INDEX deliveries_blob ON deliveries (blob_id) WHERE blob_id IS NOT NULL;

-- One row per (delivery, handler) that a route selected.
CREATE TABLE handler_runs (
    delivery_seq BIGINT  NOT NULL REFERENCES deliveries (seq),
    handler      TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('pending', 'done', 'dead')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      BIGINT,
    last_error   TEXT,
    PRIMARY KEY (delivery_seq, handler)
);

-- Every call of a handler, for `events show`.
CREATE TABLE attempts (
    delivery_seq BIGINT  NOT NULL REFERENCES deliveries (seq),
    handler      TEXT    NOT NULL,
    attempt      INTEGER NOT NULL,
    started_at   BIGINT  NOT NULL,
    finished_at  BIGINT  NOT NULL,
    outcome      TEXT    NOT NULL CHECK (outcome IN ('ok', 'retry', 'dead')),
    error        TEXT
);
CREATE INDEX attempts_delivery ON attempts (delivery_seq);

-- The ordering gate's memory per entity. Its row is what two replicas gating the same entity
-- lock, so their verdicts are decided one after the other.
CREATE TABLE entities (
    entity       TEXT    PRIMARY KEY,
    version      BIGINT,
    change       TEXT,                          -- NULL until an event was gated
    lane_next    BIGINT  NOT NULL,
    -- lane_pos of the delivery at the head of the lane (being handled or waiting for a
    -- retry); NULL when nothing of this entity has work left.
    active_pos   BIGINT,
    updated_at   BIGINT  NOT NULL
);

-- /readyz writes here to prove the store takes commits.
CREATE TABLE probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at BIGINT  NOT NULL
);
INSERT INTO probe (id, at) VALUES (1, 0);
