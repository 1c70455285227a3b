"""Multi-SK pretraining on HowTo100M features: the paper's configuration and its variants.

Every number from the paper lives here once. Variants are selected by the config string:

    --config=configs/howto.py                 the paper (contrastive + anchor consistency)
    --config=configs/howto.py:baseline        EAO per-modality baseline (consistency loss off)
    --config=configs/howto.py:demo            the demo corpus on a laptop CPU (built if missing)
    --config=configs/howto.py:demo,baseline   the demo without the consistency loss

Fields can be overridden on the command line, e.g. ``--config.optimizer.lr=1e-4``.
Set the data paths (``config.data.*``) to your copy of the features; see docs/training.md.
"""

import ml_collections

from msk_jax.loss import consistency_weights

# Configuration fields that may change when a run is resumed: how long it runs, how often it
# logs, evaluates and saves, where the data is read from, how it is laid out on the devices and
# how fast it is read. Every other field changes the state's shapes or meaning.
RESUMABLE_CHANGES = (
    "variant", "num_train_steps", "num_epochs", "log_every_steps", "checkpoint_every_steps",
    "keep_checkpoints", "eval_every_steps", "profile_steps", "profile_first_step", "eval_batch_size", "eval_ema", "mesh", "sharding_rules",
    "model.dtype", "model.remat", "objective.matmul_precision", "data.source", "data.tfds_data_dir", "data.csv", "data.caption", "data.features_2d",
    "data.features_3d", "data.audio", "data.word_vectors", "data.msrvtt", "data.youcook2", "data.demo_dir",
    "data.store_dir", "data.workers", "data.worker_processes", "data.prefetch", "data.msrvtt_complete_size", "data.youcook2_complete_size",
    "data.eval_video_tokens", "data.eval_audio_frames", "objective.sinkhorn.problems_at_once",
    "evals", "data.ucf101", "data.hmdb51", "data.digits",
)


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
    model.dtype = "bfloat16"      # compute dtype (mixed precision); parameters stay float32
    # What the backward pass recomputes (msk_jax.model.REMAT: "none", "block", "full"): memory
    # for FLOPs; the values are the same. BENCHMARKS.md "Paper config planned per device".
    model.remat = "none"
    return model


def get_objective_config(consistency: bool = True) -> ml_collections.ConfigDict:
    objective = ml_collections.ConfigDict()
    objective.contrastive_temperature = 0.05
    objective.pair_weights = {"tv": 1.0, "ta": 0.1, "va": 0.1}
    objective.consistency = consistency
    objective.consistency_temperature = 0.1   # tau of the consistency cost
    # How a consistency term compares similarities with their Multi-SK target (msk_jax.loss
    # CONSISTENCY_COSTS): "original" (the original code's BCE of exp(s / tau)), "sigmoid" or "softmax".
    objective.consistency_cost = "original"
    objective.consistency_weights = consistency_weights(text_video=1.0, audio=0.1)
    objective.contrastive_scale = 1.0   # the original's alpha_closs
    objective.consistency_scale = 1.0   # the original's beta_loss
    objective.queue_len = 5500
    # The similarity matmuls of the loss and of the anchor similarities, whose results are
    # divided by 0.05 (contrastive), fed to Multi-SK at eps 0.07 and to exp(s / 0.1): "highest"
    # (float32 also on TPUs and on TF32 GPUs), "high" or "default" (one bf16 pass on TPU).
    objective.matmul_precision = "highest"
    objective.sinkhorn = ml_collections.ConfigDict(
        {"eps": 0.07, "num_iters": 20, "required_fraction": 0.5,
         # How many of a step's 12 problems are solved together: speed and memory only, not
         # the targets (BENCHMARKS.md, "Multi-SK": measured against 1, 3, 4, 6 and all 12).
         "problems_at_once": 2})
    return objective


def get_data_config() -> ml_collections.ConfigDict:
    """Where the features are, and how clips are cut (as the original's data loader cuts them)."""
    data = ml_collections.ConfigDict()
    data.source = "files"          # "files": the original layout below; "tfds": built array_record;
                                   # "store": a feature store (read by clip window)
    data.tfds_data_dir = ""        # for source="tfds" (python -m msk_jax.tools.build_tfds ...)
    data.store_dir = ""            # for source="store" (python -m msk_jax.tools.build_feature_store ...)
    data.csv = ""                  # HowTo100M csv with a `path` column
    data.caption = ""              # caption.pickle
    data.features_2d = ""          # root of <path>/<id>_2d.npz
    data.features_3d = ""          # root of <path>/<id>_3d.npz
    data.audio = ""                # root of <path>/<id>_spec.npz
    data.word_vectors = ""         # GoogleNews-vectors-negative300.bin
    data.dim_2d = 2048
    data.dim_3d = 2048
    data.min_time = 8.0
    data.n_video_tokens = 12
    data.fps_2d = 1.0
    data.fps_3d = 1.5
    data.max_words = 20
    data.num_audio_frames = 768
    data.n_clips = 10
    data.text_audio_misaligned = True
    data.workers = 4
    data.worker_processes = True   # load videos in worker processes (else threads, which share the GIL)
    data.prefetch = 2
    # Zero-shot evaluation sets (EAO's data.tar pickles); empty paths are skipped.
    data.msrvtt = ""               # msrvtt_jsfusion_test.pkl
    data.youcook2 = ""             # youcook_val.pkl
    data.msrvtt_complete_size = 1000
    data.youcook2_complete_size = 3350
    data.eval_video_tokens = 0     # 0: the format's (48 MSR-VTT, 72 YouCook2, 48 classification)
    data.eval_audio_frames = 0     # 0: the format's (3072 MSR-VTT, 4608 YouCook2, 3072 classification)
    # Zero-shot classification sets (the original's val_cls_data_loaders; format:
    # docs/classification.md): a pickle, or a csv (video, label, splits) in a folder of HowTo100M-layout
    # features; empty paths are skipped.
    data.ucf101 = ""               # e.g. ucf101_classification.pkl
    data.hmdb51 = ""               # e.g. hmdb51_classification.pkl
    # source="demo": where the demo corpus is built (default ~/.cache/msk_jax/demo_corpus, or
    # $MSK_JAX_CACHE_DIR/demo_corpus).
    data.demo_dir = ""
    data.demo_size = "default"     # "tiny", "small", "default" (120 training videos) or "large" (1,200)
    return data


def get_evals_config() -> ml_collections.ConfigDict:
    """The evaluators (msk_jax.evaluators), their data (`sets`: config.data fields) and how often
    they run during training (`every_steps`: 0 as config.eval_every_steps, < 0 only at the end);
    `python -m msk_jax.evaluate` runs them all, or --evals=NAME,..."""
    evals = ml_collections.ConfigDict()
    evals.retrieval = ml_collections.ConfigDict({"kind": "retrieval", "sets": "msrvtt,youcook2", "every_steps": 0})
    evals.classification = ml_collections.ConfigDict({
        "kind": "classification", "sets": "ucf101,hmdb51", "every_steps": 0,
        # Prompts a class name goes into ('{}'); a class's text embedding is the mean over them.
        "templates": ("{}",),
        # 32-s windows averaged per video (1: the first 32 s, as the original configures).
        "windows": 1})
    return evals


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = set(filter(None, (arg or "").split(",")))
    unknown = variants - {"paper", "baseline", "demo"}
    if unknown:
        raise ValueError(f"configs/howto.py: unknown variant(s) {sorted(unknown)}; "
                         "use paper, baseline, demo (comma-separated).")
    config = ml_collections.ConfigDict()
    config.variant = ",".join(sorted(variants)) or "paper"
    config.model = get_model_config()
    config.objective = get_objective_config(consistency="baseline" not in variants)
    config.data = get_data_config()
    config.evals = get_evals_config()

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.lr = 5e-5
    config.optimizer.lr_decay_per_epoch = 0.9
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.ema_decay = 0.9999

    config.videos_per_batch = 216  # x n_clips = 2160 clips per step
    config.num_epochs = 15
    config.num_train_steps = -1    # > 0 overrides num_epochs
    config.seed = 0

    config.mesh = [("data", -1), ("model", 1)]
    config.sharding_rules = []     # extra (regex over parameter path, partition spec) rules
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.eval_every_steps = 5000  # and at the end; <= 0: only at the end
    config.eval_batch_size = 64
    config.eval_ema = True         # evaluate the EMA weights (else the online weights)
    # A jax.profiler trace of `profile_steps` steps from step `profile_first_step` (0: none), in
    # <workdir>/tensorboard/plugins/profile/ for TensorBoard's profile tab (process 0).
    config.profile_steps = 0
    config.profile_first_step = 10

    if "demo" in variants:
        _demo(config)
    return config


def _demo(config: ml_collections.ConfigDict) -> None:
    """The spoken-digit demo corpus: small widths, a few minutes on 2 CPU cores."""
    config.data.source = "demo"
    config.data.eval_video_tokens = 12     # the demo's test clips last at most 8 s
    config.data.eval_audio_frames = 768
    config.data.dim_2d = 128
    config.data.dim_3d = 128
    config.data.workers = 2
    config.data.worker_processes = False   # the demo's videos are small: threads keep up
    config.data.msrvtt_complete_size = -1   # the demo sets are complete: their own size
    config.data.youcook2_complete_size = -1
    # The corpus's spoken-digit classification set (source="demo": the corpus's own file).
    config.data.digits = ""
    config.evals.classification.sets = "digits"
    m = config.model
    m.video_dim, m.text_dim = 256, 50
    m.davenet_widths = (16, 16, 32, 32, 64, 64, 128)
    m.embed_dim, m.num_heads, m.projection_dim, m.num_anchors = 128, 4, 192, 16
    m.dtype = "float32"
    config.objective.queue_len = 256
    config.optimizer.lr = 1e-3
    config.optimizer.lr_decay_per_epoch = 0.95
    config.ema_decay = 0.99
    config.videos_per_batch = 8    # x 10 clips = 80 clips per step
    config.num_epochs = 40
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100
    config.eval_every_steps = 0
    config.eval_batch_size = 64
