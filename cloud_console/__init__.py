"""The fleet web console: knows agents only through the MQTT topics of DESIGN.md."""
