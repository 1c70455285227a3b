"""Parity checker: recomputes the original implementation's golden outputs with msk_jax.

    python -m msk_jax.parity GOLDEN_DIR [--json OUT]

For every known golden file present in GOLDEN_DIR, the outputs are recomputed from the file's
*inputs only* (each checker sees the file through a view that refuses output keys), compared
with the expected outputs under the tolerances of the golden README, and reported as one line
per file. Exits non-zero if any file fails.

Modules:
  golden    -- the input-only view of a golden file (`GoldenInputs`) and a recomputed `Output`.
  multisk   -- multisk.npz: the Multi-SK solver's assignment and targets, the consistency cost.
  retrieval -- retrieval.npz: the retrieval metrics.
  model     -- model_forward.npz and train_steps.npz: the forward pass and training steps on the
               converted golden weights.
  backbones -- backbones.npz: the feature extractor's ResNet-152 and ResNeXt-101
               (msk_jax.extract.backbones) on weights rebuilt from the golden's recipe.
  checker   -- the known golden files (`GOLDEN_FILES`), the comparison and the report (`run`).
  __main__  -- the command line above.
"""

from msk_jax.parity.checker import GOLDEN_FILES, REL_ERR_FLOOR, GoldenFile, check_dir, check_file, format_line, run
from msk_jax.parity.golden import GoldenInputs, Output

__all__ = ["GOLDEN_FILES", "REL_ERR_FLOOR", "GoldenFile", "GoldenInputs", "Output", "check_dir", "check_file",
           "format_line", "run"]
