"""``python -m symmech`` is the ``symmech`` command."""

import sys

from .cli import main

sys.exit(main())
