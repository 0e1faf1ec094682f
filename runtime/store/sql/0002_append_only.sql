-- History is immutable: the application may INSERT and SELECT, never UPDATE, DELETE or
-- TRUNCATE. (GDPR erasure destroys encryption keys, never rows.) A deployment should also
-- grant the application role only SELECT, INSERT on event_store; the trigger holds even for
-- the table's owner.
CREATE FUNCTION event_store_forbid_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'event_store is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'MG003',
              HINT = 'events are immutable; append a compensating event instead';
END
$$;

CREATE TRIGGER event_store_no_update_delete
    BEFORE UPDATE OR DELETE ON event_store
    FOR EACH ROW EXECUTE FUNCTION event_store_forbid_change();

CREATE TRIGGER event_store_no_truncate
    BEFORE TRUNCATE ON event_store
    FOR EACH STATEMENT EXECUTE FUNCTION event_store_forbid_change();
