-- Aggregates whose events an actor holds back behind one that failed: its later events wait
-- (in order) until the blocker succeeds, is replayed from the dead-letter queue, or is
-- skipped on purpose (`magasin dlq skip`). Kept here so a restart, a second process and the
-- CLI all see the same blocks.
CREATE TABLE magasin_parked_keys (
    actor      text        NOT NULL,
    key        text        NOT NULL,
    blocker    text        NOT NULL,
    dead       boolean     NOT NULL,
    reason     text        NOT NULL,
    since      timestamptz NOT NULL,
    PRIMARY KEY (actor, key)
);
