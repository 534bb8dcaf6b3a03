"""`python -m swa_research.report`: the sweep report of a multirun's dir
(:mod:`swa_research.analysis.report`)."""

import logging
import sys

from swa_research.analysis.report import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    sys.exit(main())
