"""multisk.npz: the Multi-Assignment Sinkhorn-Knopp solver (its assignment tensor and targets)
and the consistency cost."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from msk_jax import convert, loss, sinkhorn
from msk_jax.parity.golden import GoldenInputs, Output


def check_multisk(inputs: GoldenInputs) -> Iterable[Output]:
    import jax.numpy as jnp


    for i in range(int(inputs["n_cases"])):
        scores = inputs[f"case{i}_scores"]
        eps, niters, fraction, required = inputs[f"case{i}_params"]
        settings = dict(eps=float(eps), num_iters=int(niters), required_fraction=float(fraction))
        if sinkhorn.num_required_slots(scores.shape[1], settings["required_fraction"]) != int(required):
            raise ValueError(f"multisk.npz case {i}: R={int(required)} disagrees with "
                             f"int(K * fraction) for K={scores.shape[1]}, fraction={fraction}.")
        target = sinkhorn.multi_sinkhorn(scores, **settings).target
        tensor = sinkhorn.multi_sinkhorn_assignment(scores, **settings)
        cost = loss.consistency_cost(jnp.asarray(inputs[f"case{i}_cost_input"]), target,
                                     convert.ORIGINAL_CONSISTENCY_TEMPERATURE)
        yield Output(f"case{i}_multi_sinkhorn", np.asarray(tensor), atol=1e-4)
        yield Output(f"case{i}_calculate_sk", np.asarray(target), atol=1e-4)
        yield Output(f"case{i}_cost", np.asarray(cost), rtol=1e-5)
