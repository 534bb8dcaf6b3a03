"""`python -m swa_research.sample RUN_DIR`: text from a language-model run's SGD weights or one
of its averages (:mod:`swa_research.analysis.sample`)."""

import logging
import sys

from swa_research.analysis.sample import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    sys.exit(main())
