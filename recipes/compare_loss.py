"""``python -m recipes.compare_loss``: the command; it lives in ``recipes/train/compare_loss.py``."""

from recipes.train.compare_loss import main

if __name__ == "__main__":
    main()
