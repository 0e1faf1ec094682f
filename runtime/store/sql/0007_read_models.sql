-- Read models: the documents projections keep, and per projection the last version of each
-- aggregate they applied. A projection writes both in one transaction, so an event's effect
-- and its dedup record commit together or not at all.
--
-- Keys sort in code point order (COLLATE "C"): keyset pagination pages through the primary
-- key index, and both backends list in the same order whatever the database's locale.
CREATE TABLE read_models (
    projection  text COLLATE "C" NOT NULL,
    collection  text COLLATE "C" NOT NULL,
    key         text COLLATE "C" NOT NULL,
    doc         jsonb            NOT NULL,
    updated_at  timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, collection, key)
);

-- The row of (projection, aggregate) is locked (SELECT ... FOR UPDATE) by the transaction
-- applying one of its events: a competing consumer handling the same aggregate waits, then
-- sees the version already applied and does nothing.
CREATE TABLE projection_versions (
    projection    text COLLATE "C" NOT NULL,
    aggregate_id  text COLLATE "C" NOT NULL,
    version       integer          NOT NULL CHECK (version >= 0),
    PRIMARY KEY (projection, aggregate_id)
);
