"""Alert rules and engine, the case desk, and the outbox with its notifiers (MQTT, webhooks)."""
