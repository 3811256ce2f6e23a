"""ds_distill: knowledge distillation of Hugging Face causal LMs on DeepSpeed.

Import direction: launch/* -> recipes (trainer, cache_writer, eval_recipe) -> assembly -> components (engines,
teachers, losses, data, models, checkpoint, tracking, evaluate, ...) -> config. Only `engines` imports deepspeed;
`losses` is pure tensor code. The README's Architecture section maps every module.
"""
__version__ = "0.1.0"
