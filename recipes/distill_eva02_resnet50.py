"""A laptop-sized student distilled from the winning route: ResNet-50 (ImageNet weights) at 256 px,
~5.4 GMAC a view against EVA-02 Large/448's ~362, trained with its usual ArcFace and triplet
losses plus similarity-matrix distillation of a trained `recipes/eva02_large.py` run's embeddings
(distill.*: the student's batch similarities made to match the teacher's; any embedding widths).

First extract the teacher's embeddings of the training images (and of its validation images, in
case this run's split trains on some of them), then train the student as any recipe:

    accelerate launch -m jaguar.cli.main extract runs/eva02_large --split train
    accelerate launch -m jaguar.cli.main extract runs/eva02_large --split val
    accelerate launch recipes/distill_eva02_resnet50.py data.shards=data/shards distill.teacher=runs/eva02_large

Then `jaguar export runs/distill_resnet50 --int8` for the field laptop. Offline: give the ImageNet
weights with model.pretrained_file=... or train from scratch with model.pretrained=false.
"""

from jaguar.config import Config

config = Config()
config.model.backbone = "resnet50"
config.model.pretrained = True
config.model.img_size = [256, 256]
config.model.pooling = "gem"
config.model.neck = "bnneck"
config.model.head = "arcface"
config.model.head_scale = 30.0
config.model.head_margin = 0.5

config.data.p_identities = 8
config.data.k_images = 4
config.data.hflip = 0.5
config.data.rotation = 10.0
config.data.scale = [0.85, 1.0]
config.data.translate = 0.05
config.data.color_jitter = 0.2
config.data.num_workers = 6

config.loss.triplet_weight = 1.0
config.loss.triplet_margin = 0.3

config.distill.teacher = "runs/eva02_large"  # the run of recipes/eva02_large.py
config.distill.loss = "similarity"
config.distill.weight = 10.0  # its values are small (squared cosine differences): 10 puts it beside the ID loss

config.optim.name = "adamw"
config.optim.lr = 3e-4
config.optim.weight_decay = 0.05
config.optim.scheduler = "cosine"
config.optim.warmup_epochs = 2.0
config.optim.warmup_lr = 1e-6
config.optim.min_lr = 1e-6

config.train.epochs = 40
config.train.precision = "bf16"
config.train.eval_every = 2

config.retrieval.flip_tta = True
config.retrieval.post.qe_k = 2
config.retrieval.post.rerank = True

config.run.dir = "runs/distill_resnet50"

if __name__ == "__main__":
    from jaguar.train.entry import run_recipe

    run_recipe(__file__)
