"""`python -m jaguar ...`: the `jaguar` command."""

import sys

from jaguar.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
