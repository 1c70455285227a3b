"""Command line: builds a msk_jax TFDS dataset as array_record shards, without TensorFlow.

    python -m msk_jax.data.build_tfds howto100m_features --manual_dir=DIR --data_dir=OUT
    python -m msk_jax.data.build_tfds msrvtt_retrieval --manual_dir=DIR --data_dir=OUT
    python -m msk_jax.data.build_tfds youcook2_retrieval --manual_dir=DIR --data_dir=OUT
"""

from __future__ import annotations

import argparse
import sys

from msk_jax.data.features import DataError
from msk_jax.data.tfds_builders import BUILDERS, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msk_jax.data.build_tfds", description=__doc__.split("\n")[0])
    parser.add_argument("dataset", choices=sorted(BUILDERS))
    parser.add_argument("--manual_dir", required=True, help="folder with the original files")
    parser.add_argument("--data_dir", required=True, help="where the built dataset goes")
    args = parser.parse_args(argv)
    try:
        path = build(args.dataset, args.manual_dir, args.data_dir)
    except (FileNotFoundError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"built {args.dataset} in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
