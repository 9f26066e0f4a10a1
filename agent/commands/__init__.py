"""The `edge-agent` command line: the client commands (infer, camera, status, place), doctor, models."""
