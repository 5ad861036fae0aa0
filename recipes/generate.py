"""``python -m recipes.generate``: the command; it lives in ``recipes/infer/generate.py``."""

from recipes.infer.generate import main

if __name__ == "__main__":
    main()
