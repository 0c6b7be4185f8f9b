-- What the guard (backend/guard/) found in a document when it was indexed (backend/rag/ingest.py):
-- the lexicon categories its chunks hit, sorted, and how many chunks hit any. A flagged document
-- is still indexed: retrieval withholds blocked chunks at question time. Rewritten by every
-- indexing run in the same transaction as the chunks (backend/rag/claims.py `finish`).
ALTER TABLE rag_documents
    ADD COLUMN guard_categories     text[] NOT NULL DEFAULT '{}',
    ADD COLUMN guard_flagged_chunks integer NOT NULL DEFAULT 0;
