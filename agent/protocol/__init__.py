"""The wire contract as code (docs/protocol.md): topics, payload schemas, signing, broker addresses,
placement editing. The only part of `agent` that the console and client tools import; it imports
nothing else of ours."""
