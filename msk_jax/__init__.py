"""msk_jax: Multi-SK ("Preserving Modality Structure Improves Multi-Modal Learning") in JAX.

The method, named after the paper's parts (ARCHITECTURE.md has every module):
  sinkhorn    -- the Multi-Assignment Sinkhorn-Knopp solver (targets for anchor consistency).
  model       -- the per-modality model with its anchors; loss -- the objective (consistency
                 cost, NormSoftmax contrastive loss, their sum); train_step, train -- training.
  evaluators  -- zero-shot retrieval and classification (retrieval: R@k, MedR, MeanR);
                 data -- the readers and the batcher (data/loader.py).
  configs     -- the paper's configuration and its variants.
The tools around it: bench (benchmarks), experiments (the ablation runner and its analyses),
parity (checks msk_jax against the original implementation's golden numbers).
"""

__version__ = "0.1.0"
