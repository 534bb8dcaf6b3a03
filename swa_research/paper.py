"""`python -m swa_research.paper`: the GPU-hour estimate of the paper's presets
(:mod:`swa_research.analysis.paper`)."""

import sys

from swa_research.analysis.paper import main

if __name__ == "__main__":
    sys.exit(main())
