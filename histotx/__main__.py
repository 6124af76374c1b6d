"""``python -m histotx ...`` = ``histotx ...``."""

import sys

from histotx.cli import main

sys.exit(main())
