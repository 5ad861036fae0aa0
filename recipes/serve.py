"""``python -m recipes.serve``: the command; it lives in ``recipes/infer/serve.py``."""

from recipes.infer.serve import main

if __name__ == "__main__":
    main()
