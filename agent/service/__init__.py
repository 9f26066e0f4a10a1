"""The daemon's wiring: config, the MQTT session and outbox, the model repository, logs, systemd."""
