"""Alert rules, per-cover state and the case desk (built on top of the ingest spine)."""
