"""Serving as Frigate's `zmq` detector: its requests become tenants' frames (docs/frigate.md)."""
