"""``python -m launch.analyze``: logit lens, CKA, gate maps and Engram ablation of checkpoints
(``pretrain.inference.analyze``)."""

import sys

from pretrain.inference.analyze import main

if __name__ == "__main__":
    sys.exit(main())
