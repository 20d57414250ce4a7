"""Convert the Kaggle/challenge layout (train.csv + train/*.png RGBA, test.csv + test/) into shards
(same as `jaguar prep`); alpha must be present, it is the animal mask.

    python data_prep/prepare_kaggle.py /data/jaguar-reid data/shards --max-side 1024 --workers 8
"""

import sys

from jaguar.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["prep", *sys.argv[1:]]))
