"""Seed v2: seed v1 plus the alpha mask used for random backgrounds, stronger augmentation, mixup,
label smoothing, cosine decay and dropout before the head.

    accelerate launch recipes/resnet152_alpha_mixup.py data.shards=data/shards
"""

from jaguar.config import Config

config = Config()
config.model.backbone = "resnet152"
config.model.pretrained = True
config.model.img_size = [384, 384]
config.model.pooling = "gem"
config.model.reduce_dim = 512
config.model.neck = "bnneck"
config.model.dropout = 0.2
config.model.head = "arcface"
config.model.head_scale = 30.0
config.model.head_margin = 0.5

config.data.alpha_mode = "random"
config.data.background = "mixed"
config.data.crop_to_alpha = True
config.data.p_identities = 8
config.data.k_images = 4
config.data.hflip = 0.5
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
config.optim.scheduler = "cosine"
config.optim.warmup_epochs = 2.0
config.optim.warmup_lr = 3e-6

config.train.epochs = 40
config.train.precision = "bf16"

config.retrieval.flip_tta = True
config.run.dir = "runs/resnet152_alpha_mixup"

if __name__ == "__main__":
    from jaguar.train.entry import run_recipe

    run_recipe(__file__)
