"""anomalib-ext: five anomaly-detection model families for anomalib 2.7.

Importing the package registers every model as an ``AnomalibModule`` subclass, so anomalib's
``list_models()`` and ``get_model()`` find them.
"""

from anomalib_ext import models  # noqa: F401  (registration side effect)
from anomalib_ext.version import __version__

__all__ = ["__version__"]
