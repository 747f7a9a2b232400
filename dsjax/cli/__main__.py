"""`python -m dsjax.cli ...` is `dsjax ...`."""
import sys

from dsjax.cli import main

sys.exit(main())
