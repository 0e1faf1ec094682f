-- The latest snapshot of each aggregate. A snapshot is a cache: it is trusted only when its
-- state_schema matches the code's, and replacing it never goes back in versions.
CREATE TABLE event_store_snapshots (
    aggregate_id    varchar(255)    PRIMARY KEY,
    aggregate_type  varchar(255)    NOT NULL,
    version         integer         NOT NULL CHECK (version > 0),
    state_schema    integer         NOT NULL,
    state           jsonb           NOT NULL,
    created_at      timestamptz     NOT NULL DEFAULT now()
);
