"""anomalib-ext: five anomaly-detection model families for anomalib 2.7.

Importing the package registers every model as an ``AnomalibModule`` subclass, so anomalib's
``list_models()`` and ``get_model()`` find them. The dependencies' import-time deprecation notices are quieted
first (``anomalib_ext.quiet``); a torch/torchvision pair that cannot import is left to ``anomalib-ext doctor``.
"""

from anomalib_ext.quiet import explain_import_failure, quiet_library
from anomalib_ext.version import __version__

quiet_library()
try:
    from anomalib_ext import models  # noqa: F401  (registration side effect)
except (ImportError, RuntimeError, OSError) as error:  # a broken torch/torchvision pair fails here, first of all
    explain_import_failure(error)

__all__ = ["__version__"]
