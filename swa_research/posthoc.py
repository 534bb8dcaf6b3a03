"""`python -m swa_research.posthoc`: averages formed after training from a run's trajectory
snapshots (:mod:`swa_research.analysis.posthoc`)."""

import logging
import sys

from swa_research.analysis.posthoc import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    sys.exit(main())
