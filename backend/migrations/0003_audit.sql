-- The audit log (backend/audit.py): one append-only, hash-chained record per chat request.
--
-- hash = sha256(prev_hash || canonical JSON of the record), computed by the writer; the first
-- record's prev_hash is 64 zeros. Appends are serialized on the single row of audit_chain_head
-- (SELECT ... FOR UPDATE), which also remembers the newest record, so deleting the newest records
-- is caught by `verify` like any other gap. Never the prompt: only its HMAC-SHA256.
CREATE TABLE audit_log (
    id                  bigserial PRIMARY KEY,
    created_at          timestamptz NOT NULL,
    user_identifier     text NOT NULL,
    thread_id           text NOT NULL,
    request_id          text NOT NULL,
    prompt_hmac         text NOT NULL,
    replica             text,
    tier                text NOT NULL,
    retrieved_chunk_ids bigint[] NOT NULL DEFAULT '{}',
    cited_chunk_ids     bigint[] NOT NULL DEFAULT '{}',
    verdicts            jsonb NOT NULL DEFAULT '{}',
    prompt_tokens       integer NOT NULL DEFAULT 0,
    completion_tokens   integer NOT NULL DEFAULT 0,
    ttft_ms             integer,
    latency_ms          integer NOT NULL,
    outcome             text NOT NULL,
    prev_hash           text NOT NULL UNIQUE,  -- two records can never follow the same one
    hash                text NOT NULL UNIQUE
);
CREATE INDEX audit_log_user_created ON audit_log (user_identifier, created_at);
CREATE INDEX audit_log_thread ON audit_log (thread_id);

CREATE TABLE audit_chain_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id   bigint NOT NULL DEFAULT 0,
    hash      text NOT NULL
);
INSERT INTO audit_chain_head (hash) VALUES (repeat('0', 64));

-- Append-only in the database too: rows cannot be changed or removed, the table cannot be
-- truncated, and the head only moves forward. A superuser can still disable the triggers;
-- `qwen-stack audit verify` catches what such a session changes.
CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: % on % refused', TG_OP, TG_TABLE_NAME;
END
$$;

CREATE FUNCTION audit_head_forward() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.last_id <= OLD.last_id THEN
        RAISE EXCEPTION 'the audit chain head only moves forward';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_chain_head
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_chain_head
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_head_forward BEFORE UPDATE ON audit_chain_head
    FOR EACH ROW EXECUTE FUNCTION audit_head_forward();
