"""Convert a folder-per-identity data set (SRC/<identity>/*.png|jpg|jpeg, all going to split `train`)
into shards (same as `jaguar prep`, which detects the layout); images without alpha get an opaque mask.

    python data_prep/prepare_folders.py /data/my_animals data/my_shards --max-side 768
"""

import sys

from jaguar.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["prep", *sys.argv[1:]]))
