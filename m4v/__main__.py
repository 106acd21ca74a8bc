"""``python -m m4v`` (also ``torchrun -m m4v train ...``)."""

import sys

from m4v.cli import main

sys.exit(main())
