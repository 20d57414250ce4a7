"""Seed v2: seed v1 (recipes/resnet152_arcface.py) plus the alpha mask used for random backgrounds,
stronger augmentation, mixup, label smoothing, GeM, AdamW with cosine decay and dropout before the head.

    accelerate launch recipes/resnet152_alpha_mixup.py data.shards=data/shards
"""

from pathlib import Path

from jaguar.config import load_config

config = load_config(Path(__file__).with_name("resnet152_arcface.py"))
config.model.pooling = "gem"
config.model.dropout = 0.2

config.data.alpha_mode = "random"
config.data.background = "mixed"
config.data.crop_to_alpha = True
config.data.rotation = 15.0
config.data.scale = [0.8, 1.1]
config.data.translate = 0.1
config.data.color_jitter = 0.3
config.data.random_erasing = 0.3
config.data.mixup_alpha = 0.2
config.data.mixup_prob = 0.5

config.loss.label_smoothing = 0.1

config.optim.name = "adamw"
config.optim.lr = 3e-4
config.optim.weight_decay = 1e-3
config.optim.warmup_lr = 3e-6

config.train.epochs = 40
config.run.dir = "runs/resnet152_alpha_mixup"

if __name__ == "__main__":
    from jaguar.train.entry import run_recipe

    run_recipe(__file__)
