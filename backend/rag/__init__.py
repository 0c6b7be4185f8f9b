"""The knowledge base: parsing, chunking, embedding, the pgvector store, retrieval, the ingestion
queue and the RAG worker's HTTP API. See docs/architecture.md."""
