"""Seed v3, the winning route: EVA-02 Large at 448 px fine-tuned with GeM pooling, BNNeck and an
ArcFace head (s=30, m=0.5), AdamW 2e-5 with cosine decay, bf16, micro-batch 8 x 4 accumulation;
then flip TTA, query expansion and k-reciprocal re-ranking.

    accelerate launch recipes/eva02_large.py data.shards=data/shards run.dir=runs/eva02
"""

from jaguar.config import Config

config = Config()
config.model.backbone = "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k"
config.model.pretrained = True
config.model.img_size = [448, 448]
config.model.pooling = "gem"
config.model.neck = "bnneck"
config.model.head = "arcface"
config.model.head_scale = 30.0
config.model.head_margin = 0.5
config.model.grad_checkpointing = True

config.data.sampler = "pk"
config.data.p_identities = 2  # 2 identities x 4 images = micro-batch 8 per process
config.data.k_images = 4
config.data.hflip = 0.5
config.data.rotation = 10.0
config.data.scale = [0.85, 1.0]
config.data.translate = 0.05
config.data.color_jitter = 0.2
config.data.num_workers = 6

config.optim.name = "adamw"
config.optim.lr = 2e-5
config.optim.weight_decay = 0.05
config.optim.scheduler = "cosine"
config.optim.warmup_epochs = 1.0
config.optim.warmup_lr = 1e-7
config.optim.min_lr = 1e-7
config.optim.head_lr_mult = 10.0
config.optim.grad_clip = 1.0

config.train.epochs = 15
config.train.grad_accum = 4
config.train.precision = "bf16"
config.train.eval_every = 1

# Flip TTA and flip augmentation are this seed route's own (the challenge's v3 route used both) and stay
# on so the route reproduces. On flank-true synthetic jaguars (left and right flanks carry different
# rosettes, as real ones do) flip TTA did not help the tiny recipe (benchmarks/shortcuts.py
# --experiment flip, RESULTS.md "flip"); on real data check with `jaguar diagnose` (mirror
# self-similarity, same- vs cross-flank mAP) and try retrieval.flip_tta=false.
config.retrieval.flip_tta = True
config.retrieval.post.qe_k = 2
config.retrieval.post.rerank = True
config.retrieval.post.k1 = 20
config.retrieval.post.k2 = 6
config.retrieval.post.lambda_value = 0.3
config.retrieval.post.blend = 0.5

config.run.dir = "runs/eva02_large"

if __name__ == "__main__":
    from jaguar.train.entry import run_recipe

    run_recipe(__file__)
