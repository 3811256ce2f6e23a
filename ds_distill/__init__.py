"""ds_distill: knowledge distillation of Hugging Face causal LMs on DeepSpeed.

Import direction: launch/* -> trainer -> (engines, losses, data, models, checkpoint, tracking, evaluate) -> config.
Only `engines` and `checkpoint` import deepspeed; `losses` is pure tensor code.
"""
__version__ = "0.1.0"
