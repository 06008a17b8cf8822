"""``python -m helpers.commands.reference_run``: see :mod:`helpers.commands.reference_run`."""
import sys

from helpers.commands.reference_run import main

sys.exit(main())
