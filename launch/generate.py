"""``python -m launch.generate``: text from a checkpoint (``pretrain.inference.generate``)."""

import sys

from pretrain.inference.generate import main

if __name__ == "__main__":
    sys.exit(main())
