"""Text search over your own videos: index their windows with a trained run, query in words, in a
terminal or in a browser.

    python -m msk_jax.search index --config=configs/howto.py:demo --checkpoint=RUN --features=DIR \\
        --index=OUT [--window=8 --stride=4] [--approximate]
    python -m msk_jax.search index --index=OUT --features=DIR --append     # only the videos not in it yet
    python -m msk_jax.search index --index=OUT --remove=PATH[,PATH...]
    python -m msk_jax.search query --index=OUT "three four seven" [--k 10] [--json] [--approximate]
    python -m msk_jax.search query --index=OUT --queries=FILE [--json]
    python -m msk_jax.search serve --index=OUT [--host=127.0.0.1 --port=8080]

`index` embeds each window of each readable video of a feature folder (`videos`: the layout,
the windows) with the run's EMA weights (--weights=online for the others) into a sharded
float16 index (`store`: the manifest and the shards, and why a write stopped at any point leaves
the previous index answering; `build`: builds, appends and removals). A video that cannot be read
is named and skipped; ASR segments (a caption.pickle in DIR, or --captions) are kept as each
window's text, for display only; the extractor's stills and video files are kept for the page.

`query` embeds each query as evaluation embeds a caption and ranks the windows by cosine
(`query`; exact in bounded chunks, or approximate: `scoring`). Output: a table (rank, video,
start, end, score, ASR text) or, with --json, one JSON object per query and line.

`serve` loads the run and the index once and answers a web page and a JSON API (`server`).
"""

from msk_jax.search.build import build_index, remove_videos
from msk_jax.search.query import (QueryResult, Searcher, format_table, no_vector_message, query_data_paths,
                                  read_queries, run_query, unknown_words_message)
from msk_jax.search.store import (EMBEDDINGS, FORMAT, FORMAT_1, WINDOW_FIELDS, SearchError, SearchIndex,
                                  check_config)
from msk_jax.search.videos import FeatureLayout, window_settings, window_starts

__all__ = ["EMBEDDINGS", "FORMAT", "FORMAT_1", "WINDOW_FIELDS", "FeatureLayout", "QueryResult", "SearchError",
           "SearchIndex", "Searcher", "build_index", "check_config", "format_table", "no_vector_message",
           "query_data_paths", "read_queries", "remove_videos", "run_query", "unknown_words_message",
           "window_settings", "window_starts"]
