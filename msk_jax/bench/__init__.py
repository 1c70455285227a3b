"""Benchmarks: ``python -m msk_jax.bench {sk,step,pipeline,loop,plan,fed,all} [--config=configs/bench.py] [--json=OUT]``.

Their shapes are the config file's (``configs/bench.py:cpu_bench``, one section per command;
override a field with e.g. ``--config.step.repeats=7``). One module per benchmark:

``sk``  -- the Multi-SK solver at the production size ("sk-prod" in BENCHMARKS.md: N = 7660 rows,
           K = 64 anchors, R = 32, eps 0.07, 20 iterations, float32, 12 problems per step).
           Side by side in one run: the solver (``multi_sinkhorn`` on one problem and on a
           step's stack, with the config's ``problems_at_once`` and the others of
           ``at_once_sweep``), its JAX loop (the GPU/TPU path), the log-domain solver it
           replaced, a straightforward dense K x N x K solver, and a plain memory copy.
``step`` -- one train step of the paper architecture at CPU-sized widths ("cpu-bench" in
           BENCHMARKS.md: embed 512, 8 heads, projection 768, DAVEnet widths up to 1024, 64 anchors,
           queues of 512 filled by warm-up steps as in training, 64 clips,
           float32): median step time, clips/s, FLOP/s against the
           machine's float32 matmul peak measured in the same run, and where the time goes (the
           same step with the consistency loss off, i.e. without Multi-SK, side by side).
``pipeline`` -- the training input pipeline on the demo corpus (clips/s), or at HowTo100M's
           per-video sizes (``--config.pipeline.sizes=howto100m``).
``loop`` -- the train loop's time per step against the bare jitted step.
``plan`` -- the configs/howto.py step compiled ahead of time per accelerator, mesh and remat setting.
``fed`` -- the paper-width step on this host's accelerators, fed by worker processes from a
           synthetic feature store at HowTo100M's sizes: step time, clips/s, MFU, peak memory.
``extract`` -- the feature extractor's backbones (msk_jax.extract.backbones) at batch 64: frames/s
           of ResNet-152 on 224 x 398 frames and clips/s of ResNeXt-101 on 16 x 112 x 112
           clips, float32 and bfloat16 compute.
``search`` -- the search index's query latency (p50, p99) and memory at 10k, 100k and 1M windows of
           synthetic 6,144-d float16 embeddings, exact and approximate (faiss IVF over principal
           components) side by side, with the approximate index's recall@10.
``accelerator`` -- one command for an accelerator host (``--out=DIR``: a JSON and a markdown table,
           under 8 minutes): the paper-width step unfed and fed from a local store, the step in
           bf16 against float32 from one state, the extractor's backbones in bf16, the
           evaluation's embedding rate, the demo's wall time; ``small`` on a CPU (the tests).
``all`` -- every benchmark but ``plan``, ``fed``, ``extract``, ``search`` and ``accelerator``, one
           after the other.

``common`` holds what they share (timing, compilation, memory analysis, the machine's copy
bandwidth and matmul peak); ``__main__`` is the command line.

Times are medians over ``repeats`` runs after a warm-up call (compilation excluded); the
variants are timed round-robin, so drift on a shared machine hits them alike. Memory is XLA's
compiled memory analysis of the jitted call: arguments + outputs + temporaries - aliased bytes,
i.e. the peak of the buffers XLA allocates for it (no host-side Python objects); MB = 1e6 bytes.

New benchmarks: write a module ``NAME.py`` with ``run_NAME(**options) -> dict`` and
``cli(config) -> dict`` (reading ``config.NAME``), add its section to msk_jax/configs/bench.py and
the pair to ``BENCHMARKS``.
"""

from __future__ import annotations

from typing import Callable

from msk_jax import configs
from msk_jax.bench import accelerator, extract, fed, loop, pipeline, plan, search, sk, step

BENCHMARKS: dict[str, tuple[Callable[..., dict], str]] = {
    "sk": (sk.cli, "Multi-SK solver at the production size"),
    "step": (step.cli, "cpu-bench train step"),
    "pipeline": (pipeline.cli, "input pipeline clips/s (demo corpus, or HowTo100M sizes)"),
    "loop": (loop.cli, "the train loop's time per step against the bare jitted step"),
    "plan": (plan.cli, "the paper step compiled ahead of time per accelerator: memory, FLOPs"),
    "fed": (fed.cli, "the paper-width step on this host's accelerators, fed from a synthetic store"),
    "extract": (extract.cli, "the feature extractor's backbones: frames/s of ResNet-152 and ResNeXt-101"),
    "search": (search.cli, "search index query latency and memory at 10k-1M windows, exact and approximate"),
    "accelerator": (accelerator.cli, "one accelerator host measured in minutes (--out=DIR: JSON and table)"),
}
# minutes of compilation per target; an accelerator's memory; minutes of CPU per extractor batch;
# 12 GB of disk and minutes of CPU for a million windows; an accelerator's minutes
NOT_IN_ALL = ("plan", "fed", "extract", "search", "accelerator")
CONFIG = configs.path("bench")


def run(command: str, config) -> dict:
    """Runs benchmark `command` (or "all": every one but those of NOT_IN_ALL) with `config` (configs/bench.py)."""
    if command == "all":  # run those of NOT_IN_ALL by name
        return {name: cli(config) for name, (cli, _) in BENCHMARKS.items() if name not in NOT_IN_ALL}
    if command not in BENCHMARKS:
        raise ValueError(f"unknown benchmark '{command}'; choose from {sorted(BENCHMARKS) + ['all']}.")
    return BENCHMARKS[command][0](config)
