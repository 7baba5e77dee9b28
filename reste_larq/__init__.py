"""reste-larq: ReSTE, BNN++ and the classic BNN estimators as Larq quantizers,
the papers' binary networks, and training to an LCE-converted TFLite file."""

from reste_larq import callbacks, quantizers  # noqa: F401  (registers the quantizer names)
from reste_larq.quantizers import BNNpp, MeanAbsScaled, ReSTE  # noqa: F401

__version__ = "0.1.0"
