"""pisa: hyperparameter studies of object detectors trained with Prime Sample Attention."""

from . import _moved

__version__ = "0.1.0"

_moved.install()  # studies and models saved by earlier versions name the old module paths
