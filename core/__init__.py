"""Code shared by ingest, alerting, the simulator and the API: settings, wire contract, stores."""
