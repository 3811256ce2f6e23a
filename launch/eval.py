"""Held-out evaluation, task accuracy and generations for model directories: the entry point of
ds_distill/eval_recipe.py, whose USAGE text (`--help`) gives the commands, outputs and exit codes.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ds_distill.errors import run_main  # noqa: E402
from ds_distill.eval_recipe import column_names, main, parse_args  # noqa: E402,F401

if __name__ == "__main__":
    run_main(main)
