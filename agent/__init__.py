"""edge-agent: an MQTT-driven, multi-tenant AI inference agent for edge devices."""

__version__ = "0.1.0"
