"""``python -m recipes.evaluate``: the command; it lives in ``recipes/infer/evaluate.py``."""

from recipes.infer.evaluate import main

if __name__ == "__main__":
    main()
