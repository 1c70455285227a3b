"""The zero-shot retrieval evaluator: `msk_jax.evaluators.embedding` (every direction, MSR-VTT and YouCook2
formats) behind the `Evaluator` interface; its numbers and files are that module's."""

from __future__ import annotations

import json
from typing import Any, Mapping

from msk_jax import storage
from msk_jax.evaluators import Evaluator, embedding


class RetrievalEvaluator(Evaluator):
    """{set name: {direction: {R1, R5, R10, R50, MedR, MeanR}}} of `EvalSet`s."""

    kind = "retrieval"

    def run(self, model, variables, batch_size: int, sharding=None) -> dict[str, dict]:
        return embedding.evaluate(model, variables, self.sets, batch_size, sharding=sharding)

    def table(self, results: Mapping[str, Any]) -> str:
        return embedding.format_table(results)

    def scalars(self, results: Mapping[str, Any]) -> dict[str, float]:
        return embedding.scalars(results)

    def write(self, results: Mapping[str, Any], output_dir: str, step: int, weights: str | None = None) -> list[str]:
        path = self.result_path(output_dir, step, weights)
        storage.write_atomic(path, json.dumps(results, indent=2))
        return [path]
