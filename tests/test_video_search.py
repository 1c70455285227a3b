"""From video files to text search, as a user runs it: demo test clips written as mp4 files
(`msk_jax.demo.videos`), their features extracted with the demo backbone
(`msk_jax.extract`), indexed with the session's trained demo run and queried with their own digit
strings (`msk_jax.search`): each query ranks its own clip far above chance. (The session's run is
a narrow model trained for 80 steps: measured here, its own clip's mean rank 12.9-13.2 of 40 against
20.5 by chance, top-5 25 % against 12.5 %, top-1 5 % against 2.5 %; the demo's own 600-step run
is in README.md, "Searching your videos".)"""

import contextlib
import io
import os

import numpy as np

from msk_jax import search
from msk_jax.demo.videos import write_demo_videos
from msk_jax.extract import extractor

CLIPS = 40


def test_extracted_clips_are_found_by_their_digit_strings(trained_run, tmp_path):
    config, workdir, _ = trained_run
    videos, features, index = (str(tmp_path / name) for name in ("videos", "features", "index"))
    rows = write_demo_videos(videos, count=CLIPS, split="msrvtt", size=config.data.demo_size, progress=False)
    logged = []
    summary = extractor.run(extractor.Options(
        videos=videos, output=features, backbone="demo", captions=os.path.join(videos, "captions.csv"),
        demo_feature_dim=config.data.dim_2d, progress_seconds=1e9, log=logged.append))
    assert summary["extracted_now"] == CLIPS and not summary["failed"], logged
    with contextlib.redirect_stderr(io.StringIO()):
        search.build_index(config, workdir, features, index, window=8, stride=4, progress=False)
    searcher = search.Searcher(index)
    windows = len(searcher.index)
    queries = [row["caption"] for row in rows]
    own = [os.path.splitext(row["video"])[0] for row in rows]
    results = searcher.search(queries, k=windows)
    # The rank of each query's own clip: the best rank of any of its windows.
    ranks = []
    for result, video in zip(results, own):
        videos_in_order = list(dict.fromkeys(hit["video"] for hit in result.hits))
        ranks.append(videos_in_order.index(video) + 1)
    ranks = np.array(ranks)
    top1, top5 = float(np.mean(ranks == 1)), float(np.mean(ranks <= 5))
    # Chance: 1 / CLIPS at rank 1, 5 / CLIPS in the top 5, a mean rank of (CLIPS + 1) / 2.
    print(f"top-1 {top1:.3f} (chance {1 / CLIPS:.3f}), top-5 {top5:.3f} (chance {5 / CLIPS:.3f}), "
          f"mean rank {ranks.mean():.1f} (chance {(CLIPS + 1) / 2:.1f}), {windows} windows")
    # Under chance a rank is uniform on 1..CLIPS: its mean has standard error sqrt((CLIPS^2 - 1) / 12 / CLIPS).
    chance_mean, standard_error = (CLIPS + 1) / 2, np.sqrt((CLIPS ** 2 - 1) / 12 / CLIPS)
    assert ranks.mean() < chance_mean - 3 * standard_error, ranks
    assert top5 > 5 / CLIPS and top1 > 0, ranks
