"""The fleet web console: knows agents only through docs/protocol.md (the package agent.protocol)."""
