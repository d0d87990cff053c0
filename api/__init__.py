"""The HTTP API: operations endpoints, and registry, readings, cases, ledgers, stats, stream."""
