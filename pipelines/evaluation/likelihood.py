"""Likelihood metrics of the generative models, in nats per image.

- ``importance_weighted_bounds``: the ELBO and the importance-weighted bound
  ``log (1/k) sum_i p(x, z_i) / q(z_i | x)`` (Burda et al. 2016, "Importance Weighted
  Autoencoders"), which tightens towards ``log p(x)`` as ``k`` grows, for any model that
  gives the log-weights of ``k`` posterior samples (the VAE, DRAW).
- ``pseudo_log_likelihood``: Besag's pseudo-likelihood of an RBM, estimated by flipping one
  random bit per example (the estimator of scikit-learn's ``BernoulliRBM.score_samples``);
  an RBM's own likelihood needs its partition function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf


def importance_weighted_bounds(
    log_weights: Callable[..., tf.Tensor], images: np.ndarray, samples: int, batch: int = 500
) -> dict[str, float]:
    """``neg_elbo`` (``-mean_i log w_i``) and ``iw_neg_elbo`` (``-log mean_i w_i``) of
    ``images`` averaged over the images.

    Args:
        log_weights: callable. ``log_weights(x, k, seed=...)`` returns ``[k, B]`` values of
            ``log p(x|z) + log p(z) - log q(z|x)`` for ``k`` posterior samples ``z``.
        images: array [N, ...]. The images, as the model sees them (binarised or not).
        samples: int. ``k``, the posterior samples per image.
        batch: int. Images per call; batch ``i`` draws its samples with seed ``i``
            (its first row index), so the figures do not depend on the batch size's
            luck alone.
    """
    elbo, iw = [], []
    for start in range(0, len(images), batch):
        log_w = log_weights(tf.constant(images[start : start + batch]), samples, seed=start)
        elbo.append(-tf.reduce_mean(log_w, axis=0).numpy())
        iw.append(-(tf.reduce_logsumexp(log_w, axis=0) - math.log(samples)).numpy())
    return {
        "neg_elbo": float(np.mean(np.concatenate(elbo))),
        "iw_neg_elbo": float(np.mean(np.concatenate(iw))),
    }


def pseudo_log_likelihood(rbm, v, draws: int = 5, seed: int = 0) -> float:
    """Stochastic pseudo-log-likelihood per example, nats:
    ``V * log sigmoid(F(v~) - F(v))`` with one random bit of ``v`` flipped in ``v~``,
    averaged over ``draws`` flips.

    Args:
        rbm: ``models.rbm.RBM``. The layer whose free energy ``F`` is used.
        v: array [N, V]. Binary visible vectors.
        draws: int. Random flips per example.
        seed: int. Seed of the flipped positions.
    """
    v = tf.convert_to_tensor(v, tf.float32)
    n, dim = v.shape
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(draws):
        idx = rng.integers(0, dim, size=n)
        mask = tf.one_hot(idx, dim)
        flipped = v + mask * (1.0 - 2.0 * v)
        total += float(
            tf.reduce_mean(dim * tf.math.log_sigmoid(rbm.free_energy(flipped) - rbm.free_energy(v)))
        )
    return total / draws
