"""`python -m swa_research.dashboard`: the W&B report of a sweep
(:mod:`swa_research.analysis.dashboard`)."""

import logging
import sys

from swa_research.analysis.dashboard import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    sys.exit(main())
