"""``python -m recipes.pretrain``: the command; it lives in ``recipes/train/pretrain.py``."""

from recipes.train.pretrain import main

if __name__ == "__main__":
    main()
