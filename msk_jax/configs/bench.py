"""The benchmarks' shapes (BENCHMARKS.md), one section per `python -m msk_jax.bench` command.

    python -m msk_jax.bench step                                   # configs/bench.py:cpu_bench
    python -m msk_jax.bench step --config=configs/bench.py:cpu_bench --config.step.repeats=7
    python -m msk_jax.bench sk --config.sk.n=4000 --json=OUT

`model` is the cpu-bench model: the paper's input widths and anchor count with narrower layers,
so that one train step runs on a CPU (BENCHMARKS.md, "cpu-bench"). The objective (Multi-SK settings
included) and the clip settings are the paper's, read from configs/howto.py. `plan` compiles the
configs/howto.py step itself (its `howto` field names a variant).
"""

import ml_collections

from msk_jax.configs import howto


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if (arg or "cpu_bench") != "cpu_bench":
        raise ValueError(f"configs/bench.py: unknown variant '{arg}'; use cpu_bench.")
    config = ml_collections.ConfigDict()
    paper = howto.get_config()
    config.objective = paper.objective   # queue_len is each benchmark's own (below)
    config.data = paper.data             # the clips: 10 per video, 8 s, ...

    config.model = ml_collections.ConfigDict(dict(
        video_dim=4096, text_dim=300, audio_feat_dim=40, davenet_layers=(2, 2, 1, 1, 1, 1),
        davenet_widths=(32, 32, 64, 128, 256, 512, 1024), davenet_kernel=9, embed_dim=512, num_heads=8,
        mlp_ratio=1.0, depth=1, projection_dim=768, num_anchors=64, dtype="float32"))

    # sk: the 12 Multi-SK problems of a paper step ("sk-prod": queue 7,500 + batch 160 rows).
    # (eps, iterations, R and problems_at_once: config.objective.sinkhorn; at_once_sweep: the
    # other numbers of problems solved together, timed beside it.)
    config.sk = ml_collections.ConfigDict(dict(n=7660, k=64, problems=12, repeats=5, baseline=True, dense=True,
                                               at_once_sweep=(1, 3, 4, 6, 12)))
    # step: the cpu-bench train step.
    # compare_precision: also time the step with the objective's similarity matmuls at the
    # default precision (objective.matmul_precision is "highest").
    config.step = ml_collections.ConfigDict(dict(clips=64, queue_len=512, repeats=5, compare_precision=False))
    # loop: the train loop around that step against the bare jitted step.
    config.loop = ml_collections.ConfigDict(dict(clips=64, queue_len=512, steps=10, repeats=3))
    # pipeline: sizes "demo" (the demo corpus) or "howto100m" (a synthetic corpus at HowTo100M's
    # per-video sizes); batches 0: 30 (demo) or 12 (howto100m); grain: also time grain's workers.
    # bucket_latency_ms (howto100m): also read the store of the first bucket_videos videos from a
    # bucket on localhost answering each request after each of these latencies (() skips it).
    config.pipeline = ml_collections.ConfigDict(dict(sizes="demo", corpus_dir="", size="default", videos=300,
                                                     dtype="float32", batches=0, grain=False,
                                                     bucket_latency_ms=(0, 20, 50), bucket_videos=48))
    # plan: the configs/howto.py step compiled ahead of time per accelerator, mesh and remat
    # setting (model.remat; "" keeps the config's); store_videos_per_core 0: not given (bench
    # pipeline --sizes=howto100m measures it).
    config.plan = ml_collections.ConfigDict(dict(targets="v4-8,v5e-16,8xH100", meshes="data,fsdp,fsdp_model2",
                                                 remats="", howto="", store_videos_per_core=0.0))
    # plan's request budget: per store layout the read requests and MB read per video (what
    # `bench pipeline --config.pipeline.sizes=howto100m` measures: time blocks with the 1.125 MiB gap,
    # the kinds layout of format 1 with 64 KiB), pods of pod_hosts hosts, a paper run of
    # paper_videos x the config's epochs; from_json: the compiled rows of an earlier `--json`.
    config.plan.update(dict(layouts="time_blocks,kinds", requests_per_video=(3.98, 21.4), mb_per_video=(5.12, 2.68),
                            pod_hosts=(1, 4, 16, 64), paper_videos=1.22e6, dollars_per_1000_reads=0.0004,
                            from_json=""))
    # fed: the paper-width step (configs/howto.py widths, `dtype` compute, `remat` "" keeps the
    # config's) on this host's accelerators, fed by `workers` processes from a store of
    # `store_videos` synthetic HowTo100M-size videos; queue_len 0 keeps the paper's 5,500.
    config.fed = ml_collections.ConfigDict(dict(videos_per_batch=27, steps=10, workers=8, store_videos=120,
                                                store_dtype="float16", remat="", dtype="bfloat16", queue_len=0,
                                                corpus_dir=""))
    # extract: the feature extractor's backbones (ResNet-152 on 2D frames of frame_size, what a 16:9
    # video gives with its shorter side at 224; ResNeXt-101 on clips of clip_frames x clip_size^2),
    # `batch` frames or clips per call, in each compute dtype; a ResNet-152 batch of 64 takes tens
    # of seconds on a few CPU cores, hence few repeats.
    config.extract = ml_collections.ConfigDict(dict(batch=64, frame_size=(224, 398), clip_frames=16, clip_size=112,
                                                    kinds=("2d", "3d"), dtypes=("float32", "bfloat16"), repeats=2))
    # search: query latency and memory of the search index at each size (windows) of synthetic
    # float16 embeddings, dim 0: configs/howto.py's projection_dim; exact_queries of the queries
    # timed exactly, all approximately (candidates rescored exactly); folder: where the synthetic
    # vectors go ("": the system's temporary folder; 1M windows take 12.3 GB).
    config.search = ml_collections.ConfigDict(dict(sizes=(10_000, 100_000, 1_000_000), dim=0, queries=50,
                                                   exact_queries=10, k=10, candidates=400, approximate=True,
                                                   folder="", seed=0))
    # accelerator: one host measured within budget_seconds (parts skipped past it), written to
    # `out` (--out=DIR): the fed step as `fed` (54 videos x 10 clips, 8 workers, a float16 store of
    # 60 synthetic videos), dtype_steps more steps in bf16 and float32, the extractor's bf16
    # backbones at extract_batch, the evaluation's embedding rate, the demo's wall time; `small`:
    # tiny widths and sizes (a CPU, the tests).
    config.accelerator = ml_collections.ConfigDict(dict(out="", small=False, budget_seconds=450.0, steps=10, workers=8,
                                                        videos_per_batch=54, store_videos=60, dtype_steps=3,
                                                        extract_batch=64, corpus_dir="",
                                                        parts=("step", "dtypes", "extractor", "evaluation", "demo")))
    return config
