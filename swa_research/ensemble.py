"""`python -m swa_research.ensemble SWEEP_DIR`: deep ensembles and model soups of a sweep's runs
(:mod:`swa_research.analysis.ensemble`)."""

import logging
import sys

from swa_research.analysis.ensemble import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    sys.exit(main())
