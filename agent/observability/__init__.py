"""What the agent tells people: per-tenant stats, telemetry, /metrics, Home Assistant."""
