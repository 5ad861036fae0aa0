"""python -m recipes.memory_plan: recipes/train/plan_command.py."""
import sys

from recipes.train.plan_command import main

if __name__ == "__main__":
    sys.exit(main())
