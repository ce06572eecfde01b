"""`python -m metatransfer.report [--params params.yaml]`: write reports/index.html, print its path."""

import sys

from metatransfer.report.page import main

if __name__ == "__main__":
    sys.exit(main())
