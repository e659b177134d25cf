"""``python -m bobench`` = the ``bobench`` command."""

import sys

from bobench.cli.main import main

sys.exit(main())
