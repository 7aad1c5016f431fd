"""pisa: hyperparameter studies of object detectors trained with Prime Sample Attention."""

from .core.version import VERSION as __version__

__all__ = ["__version__"]
