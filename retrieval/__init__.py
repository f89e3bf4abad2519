"""Corpus loading and chunking, embedding, FAISS indexes, topic clustering and the topic graph."""
