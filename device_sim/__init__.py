"""The device simulator: covers that publish readings over MQTT per the wire contract."""
