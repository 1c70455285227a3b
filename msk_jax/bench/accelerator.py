"""``accelerator``: one command that measures an accelerator host, for the few minutes one is lent.

    python -m msk_jax.bench accelerator --out=DIR      # one GPU or TPU host, under 8 minutes

writes DIR/accelerator.json and DIR/accelerator.md (a markdown table), rewritten after each part,
so a run cut short keeps what it measured. The parts, in order:

1. **step**: the paper-width train step (configs/howto.py, bf16 compute, queues of 5,500) unfed
   (one device batch repeated) and fed by the training pipeline's batch tasks (worker processes)
   from a local feature store of synthetic HowTo100M-size videos (`fed.run_fed`): ms/step,
   clips/s, MFU from the lowered step's FLOPs, time waiting for input, peak device memory;
2. **dtypes**: from the state the step reached, a few more steps on the same batches in bfloat16
   and in float32 compute: each one's losses and their difference;
3. **extractor**: the feature extractor's ResNet-152 and ResNeXt-101 in bfloat16 (frames/s,
   `extract.run_extract`);
4. **evaluation**: the rate at which the evaluation embeds clips (the trained state's EMA
   weights, `evaluators.embedding.embed`, batches of config.eval_batch_size);
5. **demo**: the wall time of ``python -m msk_jax.main --config=configs/howto.py:demo`` (its
   corpus built on the CPU while parts 1-4 run, so its build is not in the wall time).

A part that fails records its error and the next part runs; a part that would start after
`budget_seconds` is skipped (the table says so). ``small=True`` (the tests, any CPU) runs the same
parts at tiny widths and sizes in seconds, with the demo's command trained for one step on the
tiny corpus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from msk_jax import storage, train
from msk_jax.bench import extract, fed
from msk_jax.bench.common import machine
from msk_jax.data import batch as batch_spec
from msk_jax.evaluators import embedding
from msk_jax.model import MultiSKModel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = ("step", "dtypes", "extractor", "evaluation", "demo")
# Tiny widths for `small` (a CPU in the tests): the paper's input widths (300-d words, 40 log-mel
# bins) at a 16 + 16-d synthetic store, layers a few units wide.
SMALL_MODEL = {"video_dim": 32, "text_dim": 300, "audio_feat_dim": 40, "davenet_layers": (1, 1, 1, 1, 1, 1),
               "davenet_widths": (4, 4, 4, 4, 4, 4, 8), "davenet_kernel": 9, "embed_dim": 16, "num_heads": 2,
               "mlp_ratio": 1, "depth": 1, "projection_dim": 24, "num_anchors": 4, "dtype": "bfloat16",
               "remat": "none"}


def step_config(small: bool):
    """configs/howto.py at the paper's widths (bf16 compute), or at SMALL_MODEL's with queues of 40
    clips and 2-video batches."""
    config = fed.paper_config()
    if small:
        config.model.update(SMALL_MODEL)
        config.objective.queue_len = 40
        config.eval_batch_size = 4
    return config


def compare_dtypes(session: dict, dtypes: tuple[str, ...] = ("bfloat16", "float32")) -> dict:
    """The losses of len(session['batches']) steps from the session's state in each compute dtype
    (the same parameters: they are float32 whatever the compute), and their differences against
    the first dtype's. The session's own dtype reuses its compiled step; another compiles one."""
    config, batches = session["config"], session["batches"]
    own = config.model.dtype
    device_batches = [train.global_batch(b, session["batch_sharding"]) for b in batches]
    losses, seconds = {}, {}
    for dtype in dtypes:
        config.model.dtype = dtype
        model = MultiSKModel.from_config(config)
        step_fn = session["step_fn"] if dtype == own else train.compile_train_step(
            session["state_sharding"].replace(model=model), session["batch_sharding"])
        # The step donates its state: each dtype starts from its own copy of the same state.
        state = jax.tree_util.tree_map(jnp.copy, session["state"]).replace(model=model)
        losses[dtype], started = [], time.perf_counter()
        for batch in device_batches:
            state, metrics = step_fn(state, batch)
            losses[dtype].append(float(metrics["loss"]))
        seconds[dtype] = time.perf_counter() - started
        del state
    config.model.dtype = own
    first, *others = dtypes
    out = {"steps": len(batches), "losses": losses, "seconds_with_compile": seconds}
    for other in others:
        difference = np.abs(np.subtract(losses[other], losses[first]))
        out[f"max_abs_difference_{other}"] = float(difference.max())
        out[f"max_relative_difference_{other}"] = float((difference / np.abs(losses[other])).max())
    return out


class _Clips:
    """Random clips with full masks in the evaluation's batch layout (what `embedding.embed` reads)."""

    def __init__(self, config, n: int, word_dim: int):
        data = config.data
        shapes = batch_spec.shapes(n, video_tokens=data.eval_video_tokens or 48, video_dim=config.model.video_dim,
                                   audio_bins=config.model.audio_feat_dim, audio_frames=data.num_audio_frames,
                                   words=data.max_words, word_dim=word_dim)
        rng = np.random.default_rng(0)
        self.batch = {k: np.ones(s, np.float32) if k.endswith("_mask") else rng.standard_normal(s, np.float32)
                      for k, s in shapes.items()}

    def __len__(self) -> int:
        return len(self.batch["video"])


def embedding_rate(session: dict, batches: int = 8) -> dict:
    """Clips/s of `embedding.embed` on `batches` batches of config.eval_batch_size random clips
    with the session state's EMA weights, after one batch that compiles it."""
    config, state = session["config"], session["state"]
    model = state.model
    variables = {"params": state.ema_params if state.ema_params is not None else state.params,
                 "batch_stats": state.batch_stats}
    size = config.eval_batch_size
    clips = _Clips(config, size * batches, config.model.text_dim)
    started = time.perf_counter()
    warm = _Clips(config, size, config.model.text_dim)
    embedding.embed(model, variables, warm, size, sharding=session["batch_sharding"])
    compile_seconds = time.perf_counter() - started
    started = time.perf_counter()
    out = embedding.embed(model, variables, clips, size, sharding=session["batch_sharding"])
    seconds = time.perf_counter() - started
    if not all(np.all(np.isfinite(v)) for v in out.values()):
        raise FloatingPointError("accelerator benchmark: the evaluation embeddings are not finite.")
    return {"clips": len(clips), "batch": size, "video_tokens": clips.batch["video"].shape[1], "seconds": seconds,
            "clips_per_second": len(clips) / seconds, "compile_seconds": compile_seconds}


def demo_command(workdir: str, small: bool) -> list[str]:
    command = [sys.executable, "-m", "msk_jax.main", "--config=configs/howto.py:demo", f"--workdir={workdir}"]
    if small:
        command += ["--config.data.demo_size=tiny", "--config.videos_per_batch=2", "--config.num_train_steps=1",
                    "--config.eval_every_steps=1"]
    return command


def start_demo_corpus(small: bool) -> subprocess.Popen:
    """Builds the demo corpus in a CPU-only process, where the demo then finds it
    (`data_sources.demo_paths` of the demo's config)."""
    code = ("from msk_jax import configs, data_sources; config = configs.get_config('howto', 'demo'); "
            f"config.data.demo_size = {'tiny' if small else 'default'!r}; data_sources.demo_paths(config)")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_demo(workdir: str, small: bool, timeout: float) -> dict:
    started = time.perf_counter()
    done = subprocess.run(demo_command(workdir, small), cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                          timeout=max(1.0, timeout))
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"the demo exited with {done.returncode}: {(done.stderr or done.stdout)[-600:]}")
    return {"seconds": seconds, "command": " ".join(["python"] + demo_command("DIR", small)[1:])}


def run_accelerator(out_dir: str, small: bool = False, budget_seconds: float = 450.0, steps: int = 10,
                    workers: int = 8, videos_per_batch: int = 54, store_videos: int = 120, dtype_steps: int = 3,
                    extract_batch: int = 64, corpus_dir: str | None = None, parts: tuple[str, ...] = PARTS) -> dict:
    """Runs the parts (`PARTS`) in order within `budget_seconds`, writing out_dir/accelerator.json
    and accelerator.md after each; returns the results."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"accelerator parts {unknown}: expected some of {', '.join(PARTS)}.")
    storage.makedirs(out_dir)
    started = time.perf_counter()
    devices = jax.devices()
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "device": devices[0].device_kind,
                     "devices": len(devices), "small": small, "budget_seconds": budget_seconds, "parts": {}}
    corpus = start_demo_corpus(small) if "demo" in parts else None
    session = None

    def run_part(name, fn):
        remaining = budget_seconds - (time.perf_counter() - started)
        if remaining <= 0:
            results["parts"][name] = {"skipped": f"out of time ({budget_seconds:.0f} s budget spent)"}
        else:
            part_started = time.perf_counter()
            try:
                results["parts"][name] = fn(remaining)
            except Exception as err:  # any failure of a part is recorded; the next part still runs
                results["parts"][name] = {"error": f"{type(err).__name__}: {err}"[:800],
                                          "where": traceback.format_exc(limit=3)[-800:]}
            results["parts"][name]["wall_seconds"] = time.perf_counter() - part_started
        write(results, out_dir)

    def step(_):
        nonlocal session
        if corpus is not None:  # its CPU work is done before the input is timed
            corpus.wait()
        if small:
            sizes = {"store_seconds": 60, "store_dim": 16, "store_videos": 8, "videos_per_batch": 2, "steps": 2,
                     "workers": 1, "store_dtype": "float32"}
        else:
            sizes = {"store_videos": store_videos, "videos_per_batch": videos_per_batch, "steps": steps,
                     "workers": workers}
        r, session = fed.run_fed(config=step_config(small), keep_batches=dtype_steps, corpus_dir=corpus_dir, **sizes)
        return r

    def dtypes(_):
        if session is None:
            raise RuntimeError("no state: the step part did not run")
        return compare_dtypes(session)

    def extractor(_):
        sizes = {"batch": 2, "frame_size": (32, 48), "clip_frames": 4, "clip_size": 32, "repeats": 1} if small else \
            {"batch": extract_batch, "repeats": 3}
        return extract.run_extract(dtypes=("bfloat16",), **sizes)

    def evaluation(_):
        if session is None:
            raise RuntimeError("no state: the step part did not run")
        return embedding_rate(session, batches=2 if small else 16)

    def demo(remaining):
        if corpus is not None and corpus.wait() != 0:
            raise RuntimeError(f"the demo corpus was not built: {corpus.stdout.read()[-600:]}")
        with tempfile.TemporaryDirectory() as workdir:
            return run_demo(os.path.join(workdir, "demo"), small, remaining)

    try:
        for name, fn in (("step", step), ("dtypes", dtypes), ("extractor", extractor), ("evaluation", evaluation),
                         ("demo", demo)):
            if name in parts:
                run_part(name, fn)
    finally:
        if corpus is not None and corpus.poll() is None:
            corpus.kill()
            corpus.wait()
    results["wall_seconds"] = time.perf_counter() - started
    write(results, out_dir)
    return results


def write(results: dict, out_dir: str) -> None:
    storage.write_atomic(storage.join(out_dir, "accelerator.json"), json.dumps(results, indent=1, default=str))
    storage.write_atomic(storage.join(out_dir, "accelerator.md"), format_accelerator(results) + "\n")


def _failed(part: dict | None) -> str | None:
    if part is None:
        return "not run"
    return part.get("skipped") or part.get("error")


def format_accelerator(r: dict) -> str:
    """The markdown table of a run (one row per figure, the part that gave it)."""
    rows = [("| part | figure | value |", None), ("| --- | --- | --- |", None)]
    parts = r["parts"]

    def add(part, figure, value):
        rows.append((f"| {part} | {figure} | {value} |", None))

    step = parts.get("step")
    if _failed(step):
        add("step", "paper-width step", _failed(step))
    else:
        mfu = f"{100 * step['mfu']:.1f} %" if step.get("mfu") is not None else "n/a (no chip peak known)"
        memory = (f"{step['peak_bytes_in_use'] / 2**30:.1f} GiB of {step['bytes_limit'] / 2**30:.1f}"
                  if step.get("peak_bytes_in_use") else "n/a")
        bare_mfu = (f"{100 * step['mfu'] * step['fed_step_seconds'] / step['bare_step_seconds']:.1f} %"
                    if step.get("mfu") is not None else "n/a")
        add("step", f"unfed (one device batch), {step['clips_per_step']} clips, {step['dtype']}",
            f"{step['bare_step_seconds'] * 1e3:.1f} ms/step, {step['clips_per_step'] / step['bare_step_seconds']:,.0f} "
            f"clips/s, MFU {bare_mfu}")
        add("step", f"fed by {step['workers']} workers (batch tasks, local store)",
            f"{step['fed_step_seconds'] * 1e3:.1f} ms/step, {step['clips_per_second']:,.0f} clips/s, MFU {mfu}, "
            f"waiting for input {step['input_wait_seconds'] * 1e3:.1f} ms/step")
        add("step", "FLOPs per step (lowered), compile", f"{step['flops_per_step'] / 1e12:.2f} TFLOP, "
            f"{step['compile_seconds']:.0f} s")
        add("step", "peak device memory", memory)
    dtypes = parts.get("dtypes")
    if _failed(dtypes):
        add("dtypes", "bf16 against float32", _failed(dtypes))
    else:
        losses = dtypes["losses"]
        add("dtypes", f"loss of {dtypes['steps']} steps from one state, bfloat16 / float32",
            "; ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(losses["bfloat16"], losses["float32"])))
        add("dtypes", "largest difference", f"{dtypes['max_abs_difference_float32']:.2e} "
            f"({100 * dtypes['max_relative_difference_float32']:.2f} %)")
    extractor = parts.get("extractor")
    if _failed(extractor):
        add("extractor", "bf16 backbones", _failed(extractor))
    else:
        h, w = extractor["frame_size"]
        t, s, _ = extractor["clip_shape"]
        add("extractor", f"ResNet-152, {h}x{w} frames, batch {extractor['batch']}, bf16",
            f"{extractor['2d_bfloat16_frames_per_second']:,.1f} frames/s")
        add("extractor", f"ResNeXt-101, {t}x{s}x{s} clips, batch {extractor['batch']}, bf16",
            f"{extractor['3d_bfloat16_clips_per_second']:,.1f} clips/s "
            f"({extractor['3d_bfloat16_frames_per_second']:,.0f} frames/s)")
    evaluation = parts.get("evaluation")
    if _failed(evaluation):
        add("evaluation", "embedding rate", _failed(evaluation))
    else:
        add("evaluation", f"embedding, batches of {evaluation['batch']}, {evaluation['video_tokens']} video tokens",
            f"{evaluation['clips_per_second']:,.0f} clips/s ({evaluation['clips']} clips)")
    demo = parts.get("demo")
    if _failed(demo):
        add("demo", "wall time", _failed(demo))
    else:
        add("demo", f"`{demo['command']}`", f"{demo['seconds']:.0f} s (corpus built beforehand)")
    title = (f"Accelerator host, {r['date']}: {r['devices']} x {r['device']} ({r['machine']})"
             + ("; small mode (tiny widths and sizes)" if r["small"] else ""))
    return "\n".join([title, ""] + [row for row, _ in rows])


def cli(config) -> dict:
    c = config.accelerator
    if not c.out:
        raise ValueError("accelerator: give the folder of its JSON and table: --out=DIR (or --config.accelerator.out).")
    results = run_accelerator(c.out, small=c.small, budget_seconds=c.budget_seconds, steps=c.steps, workers=c.workers,
                              videos_per_batch=c.videos_per_batch, store_videos=c.store_videos,
                              dtype_steps=c.dtype_steps, extract_batch=c.extract_batch,
                              corpus_dir=c.corpus_dir or None, parts=tuple(c.parts))
    print(format_accelerator(results), flush=True)
    print(f"written: {storage.join(c.out, 'accelerator.json')}, {storage.join(c.out, 'accelerator.md')}", flush=True)
    return results
