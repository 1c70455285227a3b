"""Multi-SK pretraining on HowTo100M features: the paper's configuration.

Every number from the paper lives here once. Variants are selected by the config string:

    --config=configs/howto.py            the paper (Multi-SK: contrastive + anchor consistency)
    --config=configs/howto.py:baseline   EAO per-modality baseline (consistency loss off)

Fields can be overridden on the command line, e.g. ``--config.optimizer.lr=1e-4``.
"""

import ml_collections

from msk_jax.loss import consistency_weights


def get_model_config() -> ml_collections.ConfigDict:
    """TransformerPerModalityModel2 at the paper's widths."""
    model = ml_collections.ConfigDict()
    model.video_dim = 4096        # 2048-d 2D ResNet-152 + 2048-d 3D ResNeXt-101 per token
    model.text_dim = 300          # word2vec
    model.audio_feat_dim = 40     # log-mel bins
    model.davenet_layers = (2, 2, 1, 1, 1, 1)
    model.davenet_widths = (128, 128, 256, 512, 1024, 2048, 4096)
    model.davenet_kernel = 9
    model.embed_dim = 4096
    model.num_heads = 64
    model.mlp_ratio = 1
    model.depth = 1
    model.projection_dim = 6144
    model.num_anchors = 64        # per modality, in the input space and in the joint space
    return model


def get_objective_config(consistency: bool = True) -> ml_collections.ConfigDict:
    objective = ml_collections.ConfigDict()
    objective.contrastive_temperature = 0.05
    objective.pair_weights = {"tv": 1.0, "ta": 0.1, "va": 0.1}
    objective.consistency = consistency
    objective.consistency_temperature = 0.1
    objective.consistency_weights = consistency_weights(text_video=1.0, audio=0.1)
    objective.queue_len = 5500
    objective.sinkhorn = ml_collections.ConfigDict(
        {"eps": 0.07, "num_iters": 20, "required_fraction": 0.5})
    return objective


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "paper"
    if variant not in ("paper", "baseline"):
        raise ValueError(f"configs/howto.py: unknown variant '{variant}'; use 'paper' or 'baseline'.")
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.model = get_model_config()
    config.objective = get_objective_config(consistency=variant == "paper")

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.lr = 5e-5
    config.optimizer.lr_decay_per_epoch = 0.9
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.ema_decay = 0.9999

    config.videos_per_batch = 216
    config.clips_per_video = 10   # 2160 clips per step
    config.num_epochs = 15
    config.seed = 0
    return config
