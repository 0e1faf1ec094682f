-- The audit trail: one row per business event or command outcome, recorded once (the
-- event id is unique, checked in the same transaction as the insert) and hash-chained:
-- each row's hash covers its fields and the previous row's hash, so an edited, inserted or
-- deleted row breaks the chain from there on. `audit_chain_head` anchors the last link, so
-- removing rows from the end is detected too. The trigger forbids UPDATE, DELETE and
-- TRUNCATE for everyone, the owner included; `magasin audit verify` checks the chain
-- anyway, since a superuser can disable a trigger.
CREATE TABLE audit_log (
    seq             bigint      PRIMARY KEY CHECK (seq >= 1),
    event_id        uuid        NOT NULL UNIQUE,
    kind            text        NOT NULL,  -- event (from the store) or command (an outcome)
    event_type      text        NOT NULL,
    aggregate_type  text,
    aggregate_id    text,
    correlation_id  text,
    causation_id    text,
    user_id         text,
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL,
    payload_digest  text        NOT NULL,
    prev_hash       text        NOT NULL,
    hash            text        NOT NULL
);
CREATE INDEX audit_log_correlation ON audit_log (correlation_id, seq);
CREATE INDEX audit_log_aggregate ON audit_log (aggregate_id, seq);
CREATE INDEX audit_log_user ON audit_log (user_id, seq);
CREATE INDEX audit_log_occurred ON audit_log (occurred_at);

CREATE TABLE audit_chain_head (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    seq   bigint  NOT NULL,
    hash  text    NOT NULL
);

CREATE FUNCTION audit_log_forbid_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'MG004',
              HINT = 'the audit trail is immutable evidence';
END
$$;

CREATE TRIGGER audit_log_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_forbid_change();

CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_forbid_change();
