"""reste-larq: ReSTE, BNN++ and the classic BNN estimators as Larq quantizers,
the papers' binary networks, and training to an LCE-converted TFLite file.

`import reste_larq` registers every quantizer name ("reste", "bnnpp", ...) with Larq
and Keras.
"""

from reste_larq import callbacks, quantizers  # noqa: F401  (registers the names)
from reste_larq.quantizers import BNNpp, BNNPlus, MeanAbsScaled, ReSTE  # noqa: F401

__all__ = ["BNNPlus", "BNNpp", "MeanAbsScaled", "ReSTE", "callbacks", "quantizers"]
__version__ = "0.1.0"
