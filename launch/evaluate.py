"""``python -m launch.evaluate``: a checkpoint's loss on a document, or long-context probes
(``pretrain.inference.evaluate``)."""

import sys

from pretrain.inference.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
