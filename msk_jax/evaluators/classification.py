"""The zero-shot classification evaluator: each video is scored against the text embeddings of
the class names, with its video, audio and fused video+audio embeddings.

A class's embedding is the mean of the L2-normalised text embeddings of its prompts (one per
template); a video's is the mean of its windows' embeddings (as retrieval averages the clips of
one id), and `v+a` is the mean of the L2-normalised video and audio embeddings (retrieval's
fused embedding); scores are cosine similarities. The true class's rank counts the classes
scored strictly higher, and classes scored exactly as high share the tied places (their
average), as `msk_jax.retrieval` ranks a match: top-1 counts rank 0 exactly, top-5 ranks below
5. Reported per split (each official split's test list) and as the mean over splits: top-1 and
top-5 accuracy and mean per-class (top-1) accuracy, in percent, with chance beside them; a
confusion-matrix picture of the fused scores (every video of the set once, rows normalised) goes
beside the JSON.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Mapping

import numpy as np

from msk_jax import storage
from msk_jax.data.classification_sets import ClassificationSet
from msk_jax.data.model_inputs import l2_normalize_rows
from msk_jax.evaluators import Evaluator, embedding, result_path

SCORES = ("v", "a", "v+a")    # video, audio and fused video+audio embeddings against the class texts
METRICS = ("top1", "top5", "mean_class")
PICTURE_SCORES = "v+a"


def class_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each row's true class among the (videos, classes) scores, ties averaged."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 2 or len(scores) != len(labels):
        raise ValueError(f"classification: scores must be (videos, classes) with a label per video, got "
                         f"{scores.shape} and {labels.shape}.")
    if np.isnan(scores).any():
        raise ValueError("classification: the scores contain NaN.")
    true = scores[np.arange(len(labels)), labels][:, None]
    return np.sum(scores > true, axis=1) + (np.sum(scores == true, axis=1) - 1) / 2.0


def accuracy(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """top1, top5 and mean per-class top-1 accuracy (percent; classes without a video are not
    counted in the mean)."""
    labels = np.asarray(labels)
    ranks = class_ranks(scores, labels)
    top1 = ranks == 0
    per_class = [np.mean(top1[labels == c]) for c in np.unique(labels)]
    return {"top1": 100.0 * float(np.mean(top1)), "top5": 100.0 * float(np.mean(ranks < 5)),
            "mean_class": 100.0 * float(np.mean(per_class))}


def chance(num_classes: int) -> dict[str, float]:
    """The expected metrics of random scores."""
    return {"top1": 100.0 / num_classes, "top5": 100.0 * min(5, num_classes) / num_classes,
            "mean_class": 100.0 / num_classes}


def class_embeddings(prompt_embeddings: np.ndarray, prompt_class: np.ndarray, num_classes: int) -> np.ndarray:
    """(classes, D): each class's mean of its L2-normalised prompt embeddings."""
    total = np.zeros((num_classes, prompt_embeddings.shape[1]), np.float64)
    np.add.at(total, prompt_class, l2_normalize_rows(np.asarray(prompt_embeddings, np.float64)))
    return (total / np.bincount(prompt_class, minlength=num_classes)[:, None]).astype(np.float32)


def video_embeddings(rows: Mapping[str, np.ndarray], row_video: np.ndarray, num_videos: int) -> dict[str, np.ndarray]:
    """{'v', 'a', 'v+a'} -> (videos, D): the windows of each video averaged, then fused."""
    out = {}
    counts = np.bincount(row_video, minlength=num_videos).astype(np.float64)[:, None]
    for short, modality in (("v", "video"), ("a", "audio")):
        x = rows[modality]
        total = np.zeros((num_videos, x.shape[1]), np.float64)
        np.add.at(total, row_video, x)
        out[short] = (total / counts).astype(x.dtype)
    out["v+a"] = (l2_normalize_rows(out["v"]) + l2_normalize_rows(out["a"])) / 2
    return out


def scores(videos: Mapping[str, np.ndarray], classes: np.ndarray) -> dict[str, np.ndarray]:
    """{'v', 'a', 'v+a'} -> (videos, classes) cosine similarities."""
    texts = l2_normalize_rows(classes)
    return {k: l2_normalize_rows(videos[k]) @ texts.T for k in SCORES}


def set_results(all_scores: Mapping[str, np.ndarray], labels: np.ndarray, splits: Mapping[str, np.ndarray],
                num_classes: int) -> dict[str, Any]:
    """The JSON of one set: chance, the mean over splits and each split's metrics, per score."""
    per_split = {}
    for split, member in splits.items():
        per_split[split] = {"videos": int(member.sum()),
                            **{k: accuracy(all_scores[k][member], labels[member]) for k in SCORES}}
    mean = {k: {m: float(np.mean([per_split[s][k][m] for s in per_split])) for m in METRICS} for k in SCORES}
    return {"classes": num_classes, "videos": int(len(labels)), "chance": chance(num_classes), "mean": mean,
            "splits": per_split}


@dataclasses.dataclass
class _Rows:
    """Rows to embed (`embedding.embed` reads `batch` and the length)."""

    batch: Mapping[str, Any]

    def __len__(self) -> int:
        return len(self.batch["text"])


class ClassificationEvaluator(Evaluator):
    """{set name: {'classes', 'videos', 'chance', 'mean': {score: metrics}, 'splits': {split:
    {'videos', score: metrics}}}} of `ClassificationSet`s."""

    kind = "classification"

    def __init__(self, name: str, sets: Mapping[str, ClassificationSet], every_steps: int):
        super().__init__(name, sets, every_steps)
        self.confusion: dict[str, np.ndarray] = {}  # of the last run, per set: for the pictures

    def run(self, model, variables, batch_size: int, sharding=None) -> dict[str, dict]:
        results = {}
        for name, s in self.sets.items():
            rows = embedding.embed(model, variables, s, batch_size, sharding)
            prompts = embedding.embed(model, variables, _Rows(s.prompts), batch_size, sharding)
            texts = class_embeddings(prompts["text"], s.prompt_class, len(s.classes))
            all_scores = scores(video_embeddings(rows, s.row_video, len(s.video_ids)), texts)
            results[name] = set_results(all_scores, s.labels, s.splits, len(s.classes))
            predicted = np.argmax(all_scores[PICTURE_SCORES], axis=1)
            self.confusion[name] = confusion_matrix(s.labels, predicted, len(s.classes))
        return results

    def table(self, results: Mapping[str, Any]) -> str:
        lines = []
        for name, r in results.items():
            c = r["chance"]
            lines.append(f"{name} zero-shot classification: {r['classes']} classes, {r['videos']} videos; chance "
                         f"top1 {c['top1']:.1f}, top5 {c['top5']:.1f}, mean_class {c['mean_class']:.1f}")
            lines.append(f"  {'split':<16}{'videos':>7}  {'scores':<7}" + "".join(f"{m:>11}" for m in METRICS))
            rows = [(split, str(s["videos"]), s) for split, s in r["splits"].items()]
            if len(rows) > 1:
                rows.append(("mean of splits", "", r["mean"]))
            for split, videos, metrics in rows:
                for i, k in enumerate(SCORES):
                    lead = f"  {split:<16}{videos:>7}" if i == 0 else " " * 25
                    lines.append(f"{lead}  {k:<7}" + "".join(f"{metrics[k][m]:>11.1f}" for m in METRICS))
        return "\n".join(lines)

    def scalars(self, results: Mapping[str, Any]) -> dict[str, float]:
        """'<set>/<score>/<metric>' (the mean over splits) and '<set>/<split>/<score>/<metric>'."""
        out = {}
        for name, r in results.items():
            for k in SCORES:
                out.update({f"{name}/{k}/{m}": v for m, v in r["mean"][k].items()})
                for split, s in r["splits"].items():
                    out.update({f"{name}/{split}/{k}/{m}": v for m, v in s[k].items()})
        return out

    def write(self, results: Mapping[str, Any], output_dir: str, step: int, weights: str | None = None) -> list[str]:
        path = self.result_path(output_dir, step, weights)
        storage.write_atomic(path, json.dumps(results, indent=2))
        paths = [path]
        for name in results:
            if name not in self.confusion:
                continue
            stem = result_path(output_dir, step, self.name, [name], weights, suffix="")
            picture = f"{stem}-{name}.png" if weights is None else f"{stem}.png"  # training's names no sets
            if draw_confusion(self.confusion[name], self.sets[name].classes, picture,
                              f"{name}: zero-shot {PICTURE_SCORES}, step {step}"):
                paths.append(picture)
        return paths


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(true class, predicted class) counts (numpy's bincount: sklearn.metrics alone takes seconds
    to import)."""
    return np.bincount(np.asarray(labels) * num_classes + np.asarray(predicted),
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def draw_confusion(counts: np.ndarray, classes, path: str, title: str) -> bool:
    """The row-normalised confusion matrix as a PNG at `path` (local or a URL); False, with a
    note, when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"no confusion-matrix picture {path}: matplotlib is not installed (pip install matplotlib)", flush=True)
        return False
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    n = len(classes)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(4.0 + 0.18 * n, 24.0)
    fig = Figure(figsize=(size, size * 0.9))
    ax = fig.add_subplot()
    image = ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the class's videos")
    font = max(3.0, min(9.0, 500.0 / n))
    ax.set_xticks(range(n), labels=classes, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels=classes, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    storage.write_atomic(path, buffer.getvalue())
    return True
