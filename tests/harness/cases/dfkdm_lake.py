"""DfkdmLake: an autoencoder trained in the same run, KDE on latent + reconstruction errors."""

from anomalib_ext.models import DfkdmLake
from tests.harness.case import ModelCase


def _build() -> DfkdmLake:
    return DfkdmLake(
        image_size=64,
        latent_dim=8,
        base_channels=16,
        num_downsamples=3,
        learning_rate=3e-3,
        density={"kind": "kde", "bandwidth": "loo", "n_components": 0},  # tiny data: PCA would drop latent directions
    )


# Three epochs on 32 images leave the autoencoder coarse: on the synthetic set it reaches image AUROC ~0.93
# (random scores give 0.5), so the bar sits below the default 0.95 / 0.8 but far above chance.
CASE = ModelCase(
    name="dfkdm_lake",
    build=_build,
    image_size=64,
    max_epochs=3,
    min_image_auroc=0.85,
    min_separated_fraction=0.5,
    min_peak_in_defect_fraction=0.5,  # its map is the coarse autoencoder's residual
    # too coarse for any threshold near the normal scores to beat flagging everything (p = 0.6) once validation
    # is fresh normals; Dfkdm takes the fooling test through dfkdm_backbone
    threshold_fooling_test=False,
)
