-- Queries by field (ReadModelStore.find): `doc @> '{"status": "opened"}'` uses this index.
CREATE INDEX read_models_doc ON read_models USING gin (doc jsonb_path_ops);
