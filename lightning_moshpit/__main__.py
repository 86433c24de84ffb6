"""``python -m lightning_moshpit ...`` runs the ``lightning-moshpit`` command (see :mod:`lightning_moshpit.cli`)."""

import sys

from lightning_moshpit.cli import main

sys.exit(main())
