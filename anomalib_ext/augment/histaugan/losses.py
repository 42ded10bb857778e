"""HistAuGAN losses: the DRIT++ / MDMM set, written as small functions so each can be tested alone.

Least-squares adversarial terms (stable on tiny CPU batches), cross-entropy domain classification,
L1 self and cross-cycle reconstruction, KL of the attribute posterior, L1 latent regression, and the
content-adversarial term that pushes content codes towards domain invariance.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812


def adversarial_loss(prediction: torch.Tensor, is_real: bool) -> torch.Tensor:
    """LSGAN: mean squared distance of the patch map to 1 (real) or 0 (fake)."""
    target = torch.ones_like(prediction) if is_real else torch.zeros_like(prediction)
    return F.mse_loss(prediction, target)


def domain_classification_loss(logits: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of domain logits; zero when there is a single domain (nothing to classify)."""
    if logits.shape[1] < 2:
        return logits.sum() * 0
    return F.cross_entropy(logits, domains)


def content_confusion_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the uniform distribution: the encoder wins when the content hides the domain."""
    if logits.shape[1] < 2:
        return logits.sum() * 0
    return -F.log_softmax(logits, dim=1).mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), averaged over the batch."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=1).mean()


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1: sharper than L2 for images."""
    return F.l1_loss(reconstruction, target)


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Sample from N(mean, exp(logvar)) with gradients to both."""
    return mean + torch.randn_like(mean) * (0.5 * logvar).exp()
