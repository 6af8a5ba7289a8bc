"""``python -m subzero_ds.memory``: the ``subzero-memory`` command (defined in ``cli.py``)."""

import sys

from .cli import main

sys.exit(main())
