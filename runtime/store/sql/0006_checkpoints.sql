-- Where each tailing reader (the relay, catch-up subscriptions) has got to. A checkpoint
-- only moves forward: a stale writer (a relay that lost its lease) cannot move it back.
CREATE TABLE magasin_checkpoints (
    name        text        PRIMARY KEY,
    tx_id       xid8        NOT NULL,
    position    bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
