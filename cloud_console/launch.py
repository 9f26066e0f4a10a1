"""`edge-console`'s entry point: on a device installed without the console extra, one clear line.

Console scripts are installed whatever the extras, so the check comes before anything imports the
web stack.
"""

from __future__ import annotations

import importlib.util
import sys

NEEDS = ("fastapi", "uvicorn", "argon2")


def main() -> int:
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"edge-console: the web console is not installed here (missing: {', '.join(missing)}). "
            "Install it with: pip install 'edge-agent[console]'",
            file=sys.stderr,
        )
        return 2
    from cloud_console.cli import main as console_main

    return console_main()


if __name__ == "__main__":
    sys.exit(main())
