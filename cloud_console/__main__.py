"""`python -m cloud_console` is `edge-console`."""

import sys

from cloud_console.cli import main

sys.exit(main())
