"""``python -m recipes.compare_loss``: the command (its exit status says whether the runs agree); it lives in
``recipes/train/compare_loss.py``."""

import sys

from recipes.train.compare_loss import main

if __name__ == "__main__":
    sys.exit(main())
