"""``python -m train``: the embedded CPU demo (or any command of `train.cli`)."""

import sys

from .cli import main

sys.exit(main())
