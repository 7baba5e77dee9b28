"""reste-larq: ReSTE, BNN++ and the classic BNN estimators as Larq quantizers,
the papers' binary networks, and training to an LCE-converted TFLite file.

`import reste_larq` registers every quantizer name ("reste", "bnnpp", ...) with Larq
and Keras, and exposes the library's modules, as `import larq` exposes `lq.models`:

```python
import reste_larq

model = reste_larq.models.build("resnet20_1w1a", quantizer="reste")
flatbuffer = reste_larq.export.convert(model)
```
"""

from reste_larq import _tensorflow

try:
    # Before anything else imports TensorFlow: Keras 2 as tf.keras (TF_USE_LEGACY_KERAS).
    _tensorflow.import_tensorflow()
except ModuleNotFoundError as error:  # pragma: no cover - an install without TensorFlow
    if error.name != "tensorflow":
        raise
    raise ModuleNotFoundError(
        f"reste_larq needs {_tensorflow.SUPPORTED}, or pip install -e '.[gpu]' on a CUDA machine"
    ) from error

from reste_larq import (  # noqa: E402,F401  (quantizers registers the names)
    callbacks,
    data,
    distill,
    errors,
    export,
    layers,
    models,
    provenance,
    quantizers,
    training,
)
from reste_larq.errors import ConfigError, DataFormatError, DataNotFoundError
from reste_larq.quantizers import BNNPlus, BNNpp, MeanAbsScaled, ReSTE

__all__ = [
    "BNNPlus",
    "BNNpp",
    "ConfigError",
    "DataFormatError",
    "DataNotFoundError",
    "MeanAbsScaled",
    "ReSTE",
    "callbacks",
    "data",
    "distill",
    "errors",
    "export",
    "models",
    "provenance",
    "quantizers",
    "training",
]
__version__ = "0.1.0"
