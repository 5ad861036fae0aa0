"""``python -m recipes.preprocess_data``: the command; it lives in ``recipes/data/preprocess_data.py``."""

from recipes.data.preprocess_data import main

if __name__ == "__main__":
    main()
