-- Read models partitioned by projection, so that a rebuilt projection (`magasin replay`)
-- replaces the live one by swapping tables, not by rewriting its rows.
--
-- Both tables are LIST-partitioned on `projection`. Projections live in the DEFAULT
-- partition until their first replay; a replay builds a table of its own holding rows of the
-- live name, then, in one transaction, deletes the live rows (or drops the live partition)
-- and attaches its table as the partition FOR VALUES IN (<projection>). Queries and writes
-- name the parent tables only; PostgreSQL prunes to the projection's partition.
--
-- Existing rows are copied over (with no statement timeout: a big database takes a while);
-- the old tables are dropped, and with them any GRANT made on them.
SET LOCAL statement_timeout = 0;
ALTER TABLE read_models RENAME TO read_models_unpartitioned;
ALTER INDEX read_models_pkey RENAME TO read_models_unpartitioned_pkey;
ALTER INDEX read_models_doc RENAME TO read_models_unpartitioned_doc;
ALTER TABLE projection_versions RENAME TO projection_versions_unpartitioned;
ALTER INDEX projection_versions_pkey RENAME TO projection_versions_unpartitioned_pkey;

CREATE TABLE read_models (
    projection  text COLLATE "C" NOT NULL,
    collection  text COLLATE "C" NOT NULL,
    key         text COLLATE "C" NOT NULL,
    doc         jsonb            NOT NULL,
    updated_at  timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, collection, key)
) PARTITION BY LIST (projection);
CREATE TABLE read_models_default PARTITION OF read_models DEFAULT;
CREATE INDEX read_models_doc ON read_models USING gin (doc jsonb_path_ops);

CREATE TABLE projection_versions (
    projection    text COLLATE "C" NOT NULL,
    aggregate_id  text COLLATE "C" NOT NULL,
    version       integer          NOT NULL CHECK (version >= 0),
    PRIMARY KEY (projection, aggregate_id)
) PARTITION BY LIST (projection);
CREATE TABLE projection_versions_default PARTITION OF projection_versions DEFAULT;

INSERT INTO read_models SELECT * FROM read_models_unpartitioned;
INSERT INTO projection_versions SELECT * FROM projection_versions_unpartitioned;
DROP TABLE read_models_unpartitioned;
DROP TABLE projection_versions_unpartitioned;
