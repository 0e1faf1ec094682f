-- The append path: one call, one round trip, one transaction.
--   1. a retried command (same command id) or a re-sent batch (same event ids) returns the
--      rows it wrote the first time, flagged replayed, and writes nothing;
--   2. the stream must be at p_expected_version (0 = empty) and belong to p_aggregate_type,
--      else SQLSTATE MG001 (detail: the actual version) or MG002 (detail: the actual type);
--   3. the events are inserted with consecutive versions; a concurrent writer that won the
--      race makes the INSERT fail on event_store_stream_version, which the caller reports as
--      a concurrency error, and nothing is written;
--   4. one NOTIFY per append wakes the tailing readers (delivered at commit, a hint only).
CREATE FUNCTION event_store_append(
    p_aggregate_type   text,
    p_aggregate_id     text,
    p_expected_version integer,
    p_command_id       uuid,
    p_event_ids        uuid[],
    p_event_types      text[],
    p_data             jsonb[],
    p_metadata         jsonb[],
    p_channel          text
) RETURNS TABLE (out_position bigint, out_version integer, out_aggregate_id text,
                 out_replayed boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_version integer;
    v_type    text;
BEGIN
    IF p_command_id IS NOT NULL THEN
        RETURN QUERY
            SELECT e.position, e.version, e.aggregate_id::text, true
              FROM event_store c
              JOIN event_store e ON e.aggregate_id = c.aggregate_id AND e.tx_id = c.tx_id
             WHERE c.command_id = p_command_id
             ORDER BY e.version;
        IF FOUND THEN RETURN; END IF;
    END IF;

    RETURN QUERY
        SELECT e.position, e.version, e.aggregate_id::text, true
          FROM event_store e
         WHERE e.event_id = ANY (p_event_ids)
         ORDER BY e.version;
    IF FOUND THEN RETURN; END IF;

    SELECT e.version, e.aggregate_type INTO v_version, v_type
      FROM event_store e
     WHERE e.aggregate_id = p_aggregate_id
     ORDER BY e.version DESC
     LIMIT 1;
    IF v_type IS NOT NULL AND v_type <> p_aggregate_type THEN
        RAISE EXCEPTION 'aggregate id belongs to another type'
            USING ERRCODE = 'MG002', DETAIL = v_type;
    END IF;
    IF coalesce(v_version, 0) <> p_expected_version THEN
        RAISE EXCEPTION 'stream is at another version'
            USING ERRCODE = 'MG001', DETAIL = coalesce(v_version, 0)::text;
    END IF;

    RETURN QUERY
        INSERT INTO event_store (event_id, event_type, aggregate_id, aggregate_type,
                                 event_data, metadata, version, command_id)
        SELECT t.event_id, t.event_type, p_aggregate_id, p_aggregate_type, t.data, t.metadata,
               p_expected_version + t.n::integer,
               CASE WHEN t.n = 1 THEN p_command_id END
          FROM unnest(p_event_ids, p_event_types, p_data, p_metadata)
               WITH ORDINALITY AS t(event_id, event_type, data, metadata, n)
        RETURNING position, version, aggregate_id::text, false;

    PERFORM pg_notify(p_channel, '');
END
$$;
