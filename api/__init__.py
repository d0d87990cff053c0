"""The HTTP API: health, readiness and metrics now; registry, cases and ledgers to come."""
