"""Held-out evaluation of one or more students against a teacher: perplexities, KL(teacher || student), top-1
agreement (token-weighted over the trained tokens), as JSON and a markdown table; optionally generations side by side.

    python launch/eval.py --model outputs/run/final --teacher path/to/teacher --data eval.jsonl --format chat \
        --out outputs/run/eval [--student_before path/to/student_init --prompts prompts.txt]
    deepspeed --num_gpus N launch/eval.py ...            (data-parallel: each rank evaluates a shard; sums all-reduced)
    deepspeed --num_gpus N launch/eval.py --zero3 ...    (models partitioned with ZeRO-3, for models too big for a GPU)

Task accuracy, side by side for the teacher, --student_before and every --model (rank 0, one model at a time):
    python launch/eval.py --model outputs/run/final --student_before /models/student --teacher /models/teacher \
        --lm_eval_tasks gsm8k_local --lm_eval_include ds_configs/lm_eval_tasks --humaneval --out outputs/run/eval
    (--data is then optional: without it no held-out perplexity is computed)

Several --model paths give one column each (the teacher runs once; its hidden states are reused for every model).
Writes OUT/eval.json, OUT/eval.md and, when --student_before or --prompts is given, OUT/generations.md (teacher,
student before, student after at temperatures 0.1 / 0.7 / 1.2 with fixed seeds; rank 0 only); task evaluations
add OUT/lm_eval_samples_<column>.jsonl and OUT/humaneval_<column>.jsonl.
Exit codes: 0 done, 2 a problem with the inputs (message says which), 1 otherwise.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ds_distill.eval_recipe import column_names, main, parse_args  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
