"""`python -m perfusion_dsl` runs the command line."""

import sys

from perfusion_dsl.cli import main

sys.exit(main())
