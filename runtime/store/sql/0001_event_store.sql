-- The design document's event_store table, column for column, plus:
--   position   a global, unique sequence number (an identity column);
--   tx_id      the id of the writing transaction. Readers order by (tx_id, position) and read
--              only below the oldest transaction still running, so a row whose transaction
--              commits late is never skipped: positions are taken at INSERT but become
--              visible at COMMIT, out of order; transaction ids below the snapshot's xmin can
--              no longer gain rows (see read_all in postgres.py);
--   command_id the id of the command that produced the append, on its first event only, so a
--              retried command finds its first result through a unique index.
-- created_at keeps the design's `timestamp` type and is written in UTC.
CREATE TABLE event_store (
    event_id        uuid            PRIMARY KEY,
    event_type      varchar(255)    NOT NULL,
    aggregate_id    varchar(255)    NOT NULL,
    aggregate_type  varchar(255)    NOT NULL,
    event_data      jsonb           NOT NULL,
    metadata        jsonb           NOT NULL,
    version         integer         NOT NULL CHECK (version > 0),
    created_at      timestamp       NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'),
    position        bigint          GENERATED ALWAYS AS IDENTITY,
    tx_id           xid8            NOT NULL DEFAULT pg_current_xact_id(),
    command_id      uuid,
    -- One event per version per aggregate: the optimistic concurrency guard, and the index
    -- that serves stream reads.
    CONSTRAINT event_store_stream_version UNIQUE (aggregate_id, version)
);

-- Tailing readers (relay, catch-up subscriptions, replay) walk this index.
CREATE INDEX event_store_tx_position ON event_store (tx_id, position);

CREATE UNIQUE INDEX event_store_command ON event_store (command_id) WHERE command_id IS NOT NULL;
