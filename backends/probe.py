"""`python -m backends.probe [NAME...]`: which runtimes and devices this machine has, as JSON.

The agent runs this in a child process. Probing imports every installed runtime: in the agent's own
process that held ~250 MB it never used (PyTorch, OpenVINO and LiteRT beside the one runtime it
serves), and a runtime that crashes while it is imported or scans its devices (a mismatched Edge TPU
delegate) would take the agent down. In a child it costs neither.
"""

from __future__ import annotations

import json
import sys

from backends import registry


def main(argv: list[str] | None = None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or registry.names()
    out = {}
    for name in names:
        ok, devices, reason = registry.capabilities_of(name)
        out[name] = {"available": ok, "devices": devices, "reason": reason}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
