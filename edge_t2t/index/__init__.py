"""Index: the index directory (SQLite store of record, usearch vector snapshot) and the indexer that fills it."""
