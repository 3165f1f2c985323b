"""``python -m paradapt.cli ...``: the ``paradapt`` command (torchrun and the server child process use it)."""

import sys

from . import main

sys.exit(main())
