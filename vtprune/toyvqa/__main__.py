"""Run the toyvqa command line: ``python -m vtprune.toyvqa``."""

import sys

from vtprune.toyvqa.cli import main

sys.exit(main())
