"""Corpus preparation (Ray Data: read → normalize → tokenize → pack → Parquet shards + manifest)
and the deterministic, resumable training loader. See prepare.py and loader.py."""
