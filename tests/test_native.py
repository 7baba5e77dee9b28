"""reste_larq.native: the estimators' backward passes as compiled TensorFlow ops.

The kernels must give the values of the XLA/TensorFlow forms they replace (the STE's
bit for bit, ReSTE's to float precision), be the ones a training step uses, and fail
with a clear message (or a warning and the XLA kernels) where they cannot be built.
Where no C++ compiler is on PATH the kernel tests are skipped, not failed."""

import logging
import shutil

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from reste_larq import native
from reste_larq import quantizers as Q
from reste_larq.errors import ConfigError

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None, reason="no g++: the native kernels cannot be built here"
)

SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1e-30, -1e-30, 0.1, -0.1, 0.09999999, 0.10000001]
SPECIAL += [1.0, -1.0, 1.5, -1.5, 1.5000001, 3e38, -3e38, np.inf, -np.inf, np.nan]


@pytest.fixture(scope="module")
def kernels():
    if shutil.which("g++") is None:
        pytest.skip("no g++: the native kernels cannot be built here")
    ops = native.ops()
    assert ops is not None, native.status()  # a compiler is there: the build must work
    return ops


def _inputs(dtype=tf.float32, n=1 << 16, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.array(SPECIAL, np.float32), rng.standard_normal(n).astype(np.float32)])
    x[len(SPECIAL) :] *= 2.0  # beyond t = 1.5 too
    dy = rng.standard_normal(len(x)).astype(np.float32)
    return tf.cast(x, dtype), tf.cast(dy, dtype)


@needs_compiler
@pytest.mark.parametrize("o", [1.0, 1.001, 1.37, 2.0, 3.0, 10.0, 1e3])
@pytest.mark.parametrize("t, interval", [(1.5, 0.1), (1.0, 0.05), (3.0, 0.5)])
def test_reste_grad_equals_the_reference_to_float_precision(kernels, o, t, interval):
    x, dy = _inputs()
    reference = (dy * Q.reste_gradient(x, o, t, interval)).numpy()
    got = kernels.reste_grad(x, dy, tf.constant(o), t=t, interval=interval).numpy()
    assert np.isfinite(got).all()  # x = 0, tiny, huge, inf and NaN included
    np.testing.assert_array_equal(got == 0, reference == 0)  # the same clipped region
    np.testing.assert_allclose(got, reference, rtol=5e-7, atol=0)
    # and the XLA kernel it replaces is no closer to the reference than that
    xla = Q._reste_backward(x, dy, tf.constant(o), t, interval).numpy()
    np.testing.assert_allclose(xla, reference, rtol=5e-7, atol=0)


@needs_compiler
@pytest.mark.parametrize("dtype, ulp", [(tf.bfloat16, 2.0**-7)])
@pytest.mark.parametrize("o", [1.0, 1.37, 3.0])
def test_reste_grad_in_half_precision_equals_the_reference(kernels, dtype, ulp, o):
    """g in float32, rounded to the dtype, then dy * g in the dtype, as TensorFlow's ops
    compute `dy * cast(reste_gradient(x), dtype)`: equal but where float32's last bits
    put g on the other side of a rounding tie. The XLA kernel skips the rounding of g
    (XLA's excess precision), so it is within one unit of the dtype's last place."""
    x, dy = _inputs(dtype)
    reference = (dy * tf.cast(Q.reste_gradient(x, o), dtype)).numpy().astype(np.float32)
    got = kernels.reste_grad(x, dy, tf.constant(o), t=1.5, interval=0.1)
    assert got.dtype == dtype
    got = got.numpy().astype(np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got == 0, reference == 0)
    np.testing.assert_allclose(got, reference, rtol=1.01 * ulp, atol=0)
    assert np.mean(got == reference) > 0.999
    xla = Q._reste_backward(x, dy, tf.constant(o), 1.5, 0.1).numpy().astype(np.float32)
    np.testing.assert_allclose(got, xla, rtol=1.01 * ulp, atol=0)


@needs_compiler
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("clip", [1.0, 0.5, 0.3, 0.0, -0.0, -1.0, np.inf])
def test_ste_grad_equals_larqs_clipped_gradient_bit_for_bit(kernels, dtype, clip):
    x, dy = _inputs(dtype)
    got = kernels.ste_grad(x, dy, tf.convert_to_tensor(clip, dtype))
    larq = lq.quantizers._clipped_gradient(x, dy, clip)
    bits = np.uint32 if dtype == tf.float32 else np.uint16
    np.testing.assert_array_equal(got.numpy().view(bits), larq.numpy().view(bits))
    clip_in_dtype = float(tf.cast(clip, dtype))  # 0.3 rounds up in bfloat16
    # in TensorFlow, which reads denormals (1e-45) as zero, as the kernels do
    outside = (tf.abs(tf.cast(x, tf.float32)) > clip_in_dtype).numpy()
    assert (got.numpy()[outside] == 0).all() and outside.any() != (clip == np.inf)


@needs_compiler
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_binary_sign_equals_larqs_sign_bit_for_bit(kernels, dtype):
    x, _ = _inputs(dtype)
    got, larq = kernels.binary_sign(x).numpy(), lq.math.sign(x).numpy()
    bits = np.uint32 if dtype == tf.float32 else np.uint16
    nan = np.isnan(larq.astype(np.float32))
    assert nan.sum() == 1 and np.isnan(got[nan].astype(np.float32)).all()
    np.testing.assert_array_equal(got[~nan].view(bits), larq[~nan].view(bits))
    assert set(np.unique(got[~nan].astype(np.float32))) == {-1.0, 1.0}


@needs_compiler
@pytest.mark.parametrize("quantizer", ["reste", "ste"])
def test_only_training_traces_the_native_sign(kernels, quantizer):
    """A training step's forward runs the one-pass sign; the graphs LCE converts
    (training False or None) keep Larq's three ops, the pattern LCE fuses."""
    from reste_larq.layers import OnePaddedQuantConv2D

    conv = OnePaddedQuantConv2D(
        16,
        3,
        padding="same",
        pad_values=1.0,
        input_quantizer=quantizer,
        kernel_quantizer=quantizer,
        use_bias=False,
    )
    x = tf.random.normal([8, 16, 16, 16])
    training = _gradient_ops(lambda v: conv(v, training=True), x)
    assert "BinarySign" in training and "Sign" not in training
    for mode in (False, None):
        inference = _forward_ops(lambda v: conv(v, training=mode), x)
        assert "BinarySign" not in inference and "Sign" in inference
    y_train, y_infer = conv(x, training=True), conv(x, training=False)
    np.testing.assert_allclose(y_train.numpy(), y_infer.numpy(), rtol=1e-5, atol=1e-4)


@needs_compiler
def test_kernels_reject_mismatched_shapes(kernels):
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="shape"):
        kernels.reste_grad(tf.ones([4]), tf.ones([5]), tf.constant(2.0), t=1.5, interval=0.1)


def _gradient_ops(fn, x):
    """The op types of fn's gradient graph, as a training step traces it."""

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return tape.gradient(y, x)

    graph = step.get_concrete_function(x).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph._functions.values():  # the gradient's own function bodies
        types |= {node.op for node in function.definition.node_def}
    return types


def _forward_ops(fn, x):
    graph = tf.function(fn).get_concrete_function(x).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph._functions.values():
        types |= {node.op for node in function.definition.node_def}
    return types


@needs_compiler
@pytest.mark.parametrize(
    "setting, reste_op, ste_op", [("auto", "ResteGrad", "SteGrad"), ("0", None, None)]
)
def test_training_uses_the_native_kernels_unless_switched_off(
    kernels, monkeypatch, setting, reste_op, ste_op
):
    monkeypatch.setenv("RESTE_LARQ_NATIVE", setting)
    x = tf.random.normal([8, 16, 16, 16])
    reste_ops = _gradient_ops(lambda v: Q.reste_sign(v, 2.0), x)
    ste_ops = _gradient_ops(Q.fused_ste_sign, x)
    assert ("ResteGrad" in reste_ops) == (reste_op is not None)
    assert ("SteGrad" in ste_ops) == (ste_op is not None)
    from reste_larq.layers import OnePaddedQuantConv2D

    conv = OnePaddedQuantConv2D(
        16, 3, padding="same", pad_values=1.0, input_quantizer="ste", use_bias=False
    )
    conv_ops = _gradient_ops(lambda v: conv(v, training=True), x)
    assert ("BorderSums" in conv_ops) == (reste_op is not None)
    assert ("AddAtBorder" in conv_ops) == (reste_op is not None)
    assert ("ScatterNd" in conv_ops) == (reste_op is None)
    # and the gradient's values do not depend on the setting
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = Q.reste_sign(x, 2.0)
    got = tape.gradient(y, x).numpy()
    np.testing.assert_allclose(got, Q.reste_gradient(x, 2.0).numpy(), rtol=5e-7, atol=0)


def test_bad_setting_names_the_choices(monkeypatch):
    monkeypatch.setenv("RESTE_LARQ_NATIVE", "yes")
    with pytest.raises(ConfigError, match="auto, 0, 1"):
        native.ops()


def test_missing_compiler_is_a_clear_error(tmp_path):
    with pytest.raises(native.NativeKernelsError, match="install g\\+\\+"):
        native.build(str(tmp_path), cxx="no-such-compiler-here")
    assert not list(tmp_path.rglob("*.so"))


@pytest.mark.skipif(shutil.which("false") is None, reason="no `false` command")
def test_failing_compiler_is_a_clear_error(tmp_path):
    with pytest.raises(native.NativeKernelsError, match="exited with 1"):
        native.build(str(tmp_path), cxx="false")
    assert not list(tmp_path.rglob("*.so"))  # no half-written library left to load


def test_unavailable_kernels_warn_once_and_fall_back_or_raise(monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise native.NativeKernelsError("no C++ compiler 'g++' on PATH")

    monkeypatch.setattr(native, "build", fail)
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setenv("RESTE_LARQ_NATIVE", "auto")
    with caplog.at_level(logging.WARNING, logger="reste_larq.native"):
        assert native.ops() is None
        assert native.ops() is None
    warnings = [r for r in caplog.records if "native kernels unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    assert "XLA kernels" in native.status()
    # the quantizers then train with the XLA kernels, the same values
    x = tf.random.normal([4, 8, 8, 16])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = Q.reste_sign(x, 3.0)
    np.testing.assert_allclose(
        tape.gradient(y, x).numpy(), Q.reste_gradient(x, 3.0).numpy(), rtol=5e-7, atol=0
    )
    monkeypatch.setenv("RESTE_LARQ_NATIVE", "1")
    with pytest.raises(native.NativeKernelsError, match="did not load"):
        native.ops()


@needs_compiler
def test_build_is_cached(tmp_path):
    first = native.build(str(tmp_path))
    mtime = tmp_path.joinpath(first).stat().st_mtime_ns
    assert native.build(str(tmp_path)) == first
    assert tmp_path.joinpath(first).stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["reste_ops.so"]


@needs_compiler
def test_saved_models_store_no_native_op(kernels, tmp_path):
    """A SavedModel keeps the custom gradients it traces; with a native op in them it
    would not load where the library is absent ("Op type not registered")."""
    from tensorflow.core.protobuf import saved_model_pb2

    inputs = tf.keras.Input((8, 8, 16))
    conv = lq.layers.QuantConv2D(
        16, 3, input_quantizer=Q.ReSTE(o=2.0), kernel_quantizer="ste", use_bias=False
    )
    model = tf.keras.Model(inputs, conv(inputs))
    with tf.GradientTape() as tape:  # the training path does use the native ops
        y = model(tf.random.normal([2, 8, 8, 16]), training=True)
    assert all(g is not None for g in tape.gradient(y, model.trainable_variables))
    tf.saved_model.save(model, str(tmp_path))
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString(tmp_path.joinpath("saved_model.pb").read_bytes())
    library = saved.meta_graphs[0].graph_def.library.function
    types = {node.op for function in library for node in function.node_def}
    assert types and not types & {"ResteGrad", "SteGrad"}


@needs_compiler
@pytest.mark.parametrize(
    "dtypes, native_kernels",
    [
        ((tf.float32,), True),
        ((tf.bfloat16, tf.bfloat16), True),
        ((tf.float16, tf.float16), False),  # no float16 kernels: the XLA ones
        ((tf.float32, tf.bfloat16), False),  # the kernels take one dtype
        ((tf.float64,), False),
    ],
)
def test_ops_for_chooses_by_dtype(kernels, dtypes, native_kernels):
    tensors = [tf.zeros([4], dtype) for dtype in dtypes]
    assert (native.ops_for(*tensors) is kernels) == native_kernels


def test_a_visible_gpu_keeps_the_xla_kernels(monkeypatch):
    """The kernels are CPU-only: on a GPU machine they would copy every activation to
    the host and back (no GPU here; the decision is what is tested)."""
    monkeypatch.setattr(native, "_gpu_visible", lambda: True)
    monkeypatch.setenv("RESTE_LARQ_NATIVE", "1")
    assert native.ops() is None
    assert "GPU" in native.status()
    ops = _gradient_ops(lambda v: Q.reste_sign(v, 2.0), tf.random.normal([8, 16, 16, 16]))
    assert "ResteGrad" not in ops


_STRIPS = [
    ((8, 6, 6, 16), (1, 1, 1, 1)),  # 3x3 stride 1
    ((8, 3, 3, 32), (0, 1, 0, 1)),  # 3x3 stride 2 on an even input
    ((4, 7, 5, 3), (2, 1, 0, 2)),  # uneven strips, odd channels
    ((2, 4, 4, 8), (0, 0, 0, 0)),  # no border
    ((3, 2, 2, 4), (1, 1, 1, 1)),  # all border
]


@needs_compiler
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("shape, strips", _STRIPS)
def test_border_sums_equal_the_xla_reduction(kernels, dtype, shape, strips):
    from reste_larq import layers

    dy = tf.cast(tf.random.stateless_normal(shape, [1, 2]), dtype)
    got = kernels.border_sums(dy, rt=strips[0], rb=strips[1], cl=strips[2], cr=strips[3])
    xla = layers._border_sums_xla(dy, strips)
    assert got.shape == xla.shape and got.dtype == dtype
    rtol = 1e-6 if dtype == tf.float32 else 2.0**-7  # float32 sums in another order
    np.testing.assert_allclose(
        got.numpy().astype(np.float32), xla.numpy().astype(np.float32), rtol=rtol, atol=1e-6
    )


def _border_positions(h, w, strips):
    rt, rb, cl, cr = strips
    grid = np.arange(h * w).reshape(h, w)
    middle = grid[rt : h - rb]
    parts = [grid[:rt], grid[h - rb :], middle[:, :cl], middle[:, w - cr :]]
    return np.concatenate([p.ravel() for p in parts]).astype(np.int64)


@needs_compiler
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize(
    "shape, strips",
    _STRIPS + [((64, 32, 32, 16), (1, 1, 1, 1))],  # sharded copy
)
@pytest.mark.parametrize("in_place", [False, True])
def test_add_at_border_equals_the_scatter_and_add(kernels, dtype, shape, strips, in_place):
    """The forward border term: the values of `outputs + scatter(values)`, whether the op
    writes into its input's buffer (a fresh tensor in a traced function) or copies it
    first (an input still referenced), and the input left as it was."""
    _, h, w, c = shape
    positions = _border_positions(h, w, strips)
    outputs = tf.cast(tf.random.stateless_normal(shape, [3, 4]), dtype)
    values = tf.cast(tf.random.stateless_normal([len(positions), c], [5, 6]), dtype)
    before = outputs.numpy().copy()
    rt, rb, cl, cr = strips

    @tf.function
    def fresh(outputs, values):  # the Mul's result has no other reader: forwardable
        return kernels.add_at_border(outputs * 1.0, values, rt=rt, rb=rb, cl=cl, cr=cr)

    if in_place:
        got = fresh(outputs, values)
    else:
        got = kernels.add_at_border(outputs, values, rt=rt, rb=rb, cl=cl, cr=cr)
    dense = tf.scatter_nd(tf.constant(positions[:, None]), values, [h * w, c])
    expected = outputs + tf.reshape(dense, [1, h, w, c])
    assert got.shape == shape and got.dtype == dtype
    np.testing.assert_array_equal(
        got.numpy().astype(np.float32), expected.numpy().astype(np.float32)
    )
    np.testing.assert_array_equal(outputs.numpy(), before)


@needs_compiler
def test_conv_adds_the_border_in_place_unless_told_not_to(kernels):
    from reste_larq.layers import OnePaddedQuantConv2D

    conv = OnePaddedQuantConv2D(
        16, 3, padding="same", pad_values=1.0, input_quantizer="ste", use_bias=False
    )
    x = tf.random.normal([8, 16, 16, 16])
    in_place = conv(x, training=True)
    assert "AddAtBorder" in _forward_ops(lambda v: conv(v, training=True), x)
    conv.add_border_in_place = False
    ops = _forward_ops(lambda v: conv(v, training=True), x)
    assert "AddAtBorder" not in ops and "ScatterNd" in ops
    np.testing.assert_array_equal(in_place.numpy(), conv(x, training=True).numpy())


@needs_compiler
def test_add_at_border_rejects_values_of_the_wrong_shape(kernels):
    with pytest.raises(tf.errors.InvalidArgumentError, match="values must have shape"):
        kernels.add_at_border(tf.ones([2, 3, 3, 4]), tf.ones([7, 4]), rt=1, rb=1, cl=1, cr=1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="border strips"):
        kernels.add_at_border(tf.ones([2, 3, 3, 4]), tf.ones([9, 4]), rt=2, rb=2, cl=0, cr=0)


@needs_compiler
def test_border_sums_reject_strips_larger_than_dy(kernels):
    with pytest.raises(tf.errors.InvalidArgumentError, match="border strips"):
        kernels.border_sums(tf.ones([2, 3, 3, 4]), rt=2, rb=2, cl=0, cr=0)


@needs_compiler
def test_a_jit_compiled_step_traces_the_xla_kernels(kernels):
    """`model.compile(jit_compile=True)` (the CLI's --jit-compile) compiles the whole step
    with XLA, which cannot compile a custom op: there the XLA kernels are traced."""
    from reste_larq.layers import OnePaddedQuantConv2D

    conv = OnePaddedQuantConv2D(
        8, 3, padding="same", pad_values=1.0, input_quantizer=Q.ReSTE(o=2.0), use_bias=False
    )
    x = tf.random.normal([2, 6, 6, 4])
    conv(x)

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = conv(x, training=True) + Q.fused_ste_sign(x[..., :1])
        return tape.gradient(y, [x, conv.kernel])

    for got, want in zip(tf.function(step, jit_compile=True)(x), tf.function(step)(x)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    assert "ResteGrad" in _gradient_ops(lambda v: conv(v, training=True), x)
