"""The paper's settings as the tests use them, read from configs/howto.py (their one source)."""

import dataclasses

from msk_jax import data_sources
from msk_jax.loss import ObjectiveConfig
from tests.train_fixtures import load_config

PAPER = load_config("")
# multi_sinkhorn's settings: eps, num_iters, required_fraction (and problems_at_once).
PAPER_SK = dict(PAPER.objective.sinkhorn)


def paper_objective(**changes) -> ObjectiveConfig:
    return dataclasses.replace(ObjectiveConfig.from_config(PAPER.objective), **changes)


def paper_clip_settings(**changes):
    return dataclasses.replace(data_sources.clip_settings(PAPER), **changes)
