"""pisa: hyperparameter studies of object detectors trained with Prime Sample Attention."""

__version__ = "0.1.0"
