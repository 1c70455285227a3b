"""msk_jax: Multi-SK ("Preserving Modality Structure Improves Multi-Modal Learning") in JAX.

Modules, named after the paper's parts:
  sinkhorn   -- the Multi-Assignment Sinkhorn-Knopp solver (targets for anchor consistency).
  loss       -- the objective: consistency cost, NormSoftmax contrastive loss, their sum.
  retrieval  -- zero-shot retrieval metrics (R@k, MedR, MeanR).
  parity     -- checks msk_jax against the original implementation's golden numbers.
"""

__version__ = "0.1.0"
