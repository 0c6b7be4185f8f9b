-- Knowledge bases, their documents and chunks (backend/rag/store.py).
-- The chunks' `embedding vector(dim)` column and its HNSW index are not created here: the dimension
-- is a setting, so KnowledgeStore.ensure_embedding adds them on first start and records the model
-- and dimension in rag_meta.
CREATE TABLE rag_kbs (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL UNIQUE,
    description text NOT NULL DEFAULT '',
    public      boolean NOT NULL DEFAULT true,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rag_kb_grants (
    kb_id           uuid NOT NULL REFERENCES rag_kbs (id) ON DELETE CASCADE,
    user_identifier text NOT NULL,
    access          text NOT NULL CHECK (access IN ('read', 'write')),
    PRIMARY KEY (kb_id, user_identifier)
);

CREATE TABLE rag_documents (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kb_id        uuid NOT NULL REFERENCES rag_kbs (id) ON DELETE CASCADE,
    filename     text NOT NULL,
    content_hash text NOT NULL,
    size_bytes   bigint NOT NULL DEFAULT 0,
    format       text,
    storage_key  text NOT NULL,
    status       text NOT NULL DEFAULT 'queued'
                 CHECK (status IN ('queued', 'processing', 'indexed', 'failed')),
    error_code   text,
    error        text,
    progress     real NOT NULL DEFAULT 0,
    chunk_count  integer NOT NULL DEFAULT 0,
    attempts     integer NOT NULL DEFAULT 0,
    lease_token  uuid,
    lease_until  timestamptz,
    uploaded_by  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    indexed_at   timestamptz,
    UNIQUE (kb_id, content_hash)
);
-- The reconciler's scan for documents stuck in queued / processing.
CREATE INDEX rag_documents_status_updated ON rag_documents (status, updated_at)
    WHERE status IN ('queued', 'processing');
CREATE INDEX rag_documents_storage_key ON rag_documents (storage_key);

CREATE TABLE rag_chunks (
    id          bigserial PRIMARY KEY,
    document_id uuid NOT NULL REFERENCES rag_documents (id) ON DELETE CASCADE,
    kb_id       uuid NOT NULL REFERENCES rag_kbs (id) ON DELETE CASCADE,
    idx         integer NOT NULL,
    text        text NOT NULL,
    search_text text NOT NULL,  -- jieba-segmented, space-joined (backend/rag/fulltext.py)
    heading     text,
    page_start  integer,
    page_end    integer,
    char_start  integer NOT NULL,
    char_end    integer NOT NULL,
    tokens      integer NOT NULL,
    tsv         tsvector GENERATED ALWAYS AS (to_tsvector('simple', search_text)) STORED,
    UNIQUE (document_id, idx)
);
CREATE INDEX rag_chunks_tsv ON rag_chunks USING gin (tsv);
CREATE INDEX rag_chunks_kb ON rag_chunks (kb_id);

CREATE TABLE rag_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
