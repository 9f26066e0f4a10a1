"""The fleet web console: knows agents only through the MQTT topics of docs/protocol.md (package agent.protocol)."""
