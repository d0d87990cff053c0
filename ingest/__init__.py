"""The MQTT consumer: receive telemetry, decode it, batch it into the time-series store."""
