"""Reconstruction's training objective: ``l2 * MSE + ssim * (1 - SSIM) [+ kl * KL]``, weights in one group.

The loss itself is the shared ``components.ReconstructionLoss`` (``DfkdmLake`` trains the same autoencoder with
it); this module holds what only Reconstruction needs: its three weights as one config key.
"""

from __future__ import annotations

from dataclasses import dataclass

from anomalib_ext.models.components import ReconstructionLoss
from anomalib_ext.models.components.settings import Settings

__all__ = ["LossWeights", "ReconstructionLoss", "build_loss"]


@dataclass(frozen=True)
class LossWeights(Settings):
    """Weights of the loss terms (``loss_weights: {l2: 1.0, ssim: 1.0, kl: 0.0001}``; keys left out keep these).

    Args:
        l2: mean squared error (intensities). Alone it rewards blurry reconstructions.
        ssim: ``1 - mean SSIM`` (11-tap Gaussian window, sigma 1.5): keeps edges and texture.
        kl: the VAE's KL divergence (summed over the code, averaged over the batch); ignored by the plain AE.
            1e-3 over-regularised on bottle in 0.1.x (blurred reconstructions), hence 1e-4.
    """

    l2: float = 1.0
    ssim: float = 1.0
    kl: float = 1e-4


def build_loss(weights: LossWeights) -> ReconstructionLoss:
    """The shared loss with ``weights`` (it checks them: none negative, not both l2 and ssim 0)."""
    return ReconstructionLoss(l2_weight=weights.l2, ssim_weight=weights.ssim, beta=weights.kl)
