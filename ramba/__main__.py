"""`python -m ramba` runs the command line."""

import sys

from ramba.cli.main import main

sys.exit(main())
