"""Generate a synthetic jaguar data set in the challenge layout (same as `jaguar synth`).

    python data_prep/make_synthetic.py data/synth --identities 31 --train-images 1895 --test-images 371
"""

import sys

from jaguar.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))
