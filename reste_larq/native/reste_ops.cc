// reste_larq's native CPU kernels: the estimators' backward passes as TensorFlow ops.
//
// Why: inside a training step on a CPU, an XLA-compiled elementwise function costs
// more than a TensorFlow op doing the same memory work (see reste_larq/native/__init__.py
// for the measurements), and ReSTE's backward needs an exp and a log per element, which
// TensorFlow's own ops would spend eight passes over memory on. Each kernel here is one
// pass, vectorized by the compiler, sharded over TensorFlow's intra-op threads, and
// writes into dy's buffer when TensorFlow allows it.
//
// Built on first use by reste_larq.native with the system C++ compiler against the
// installed TensorFlow's headers.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

using namespace tensorflow;

namespace {

inline float bits_to_float(int32_t i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int32_t float_to_bits(float f) { int32_t i; std::memcpy(&i, &f, 4); return i; }

// log(v) for a positive normal float v, branch-free so that the loop vectorizes: v =
// m * 2^e with m in [sqrt(1/2), sqrt(2)), log(v) = log1p(m - 1) + e log(2), log1p by
// the minimax polynomial of Cephes' logf (Moshier), log(2) split in two parts so that
// e * log(2) adds no rounding error. Within 4.3e-7 (relative) of XLA's log-exp form
// on the ReSTE gradient (tests/test_native.py).
inline float log_pos(float v) {
  int32_t b = float_to_bits(v);
  float e = static_cast<float>((b >> 23) - 127);
  float m = bits_to_float((b & 0x007fffff) | 0x3f800000);  // [1, 2)
  bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1.0f : e;
  float f = m - 1.0f;
  float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  return f + y + e * 0.693359375f;
}

// exp(a), a clamped to [-87, 88] (no overflow): a = n log(2) + r, |r| <= log(2) / 2,
// exp(r) by Cephes' expf polynomial, 2^n built from its bits. n is rounded by adding
// and subtracting 1.5 * 2^23 (round to nearest), which vectorizes where nearbyint()
// is a library call.
inline float exp_clamped(float a) {
  a = a < -87.0f ? -87.0f : (a > 88.0f ? 88.0f : a);
  float n = (a * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = a - n * 0.693359375f - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return y * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}


// Element access by dtype, branch-free so that the loops vectorize (Eigen's bfloat16
// conversions do not: 18 ms against 1.2 per 2M-element pass here). bfloat16 is the
// high half of a float32; rounding to nearest even, NaN kept quiet with its sign, as
// Eigen::bfloat16 rounds.
struct F32 {
  using Tensor = float;
  using Bits = float;
  using Int = uint32_t;
  static constexpr uint32_t kAll = 0xffffffffu;
  static float load(float v) { return v; }
  static float store(float f) { return f; }
  static float round(float f) { return f; }
};

struct BF16 {
  using Tensor = Eigen::bfloat16;
  using Bits = uint16_t;
  using Int = uint16_t;
  static constexpr uint16_t kAll = 0xffffu;
  static float load(uint16_t h) { return bits_to_float(static_cast<int32_t>(uint32_t{h} << 16)); }
  static uint16_t store(float f) {
    const uint32_t b = static_cast<uint32_t>(float_to_bits(f));
    const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    const uint32_t nan = ((b >> 16) & 0x8000u) | 0x7fc0u;
    return static_cast<uint16_t>(f != f ? nan : rounded);
  }
  // f rounded to bfloat16 and back, for finite f
  static float round(float f) {
    const uint32_t b = static_cast<uint32_t>(float_to_bits(f));
    return bits_to_float(static_cast<int32_t>((b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u));
  }
};

template <typename D>
const typename D::Bits* bits(const Tensor& t) {
  return reinterpret_cast<const typename D::Bits*>(t.flat<typename D::Tensor>().data());
}
template <typename D>
typename D::Bits* bits(Tensor* t) {
  return reinterpret_cast<typename D::Bits*>(t->flat<typename D::Tensor>().data());
}

// work(begin, end) over [0, total) on TensorFlow's CPU worker threads.
void ParallelFor(OpKernelContext* ctx, int64_t total, int64_t cost_per_unit,
                 const std::function<void(int64_t, int64_t)>& work) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  Shard(workers->NumThreads(), workers, total, cost_per_unit, work);
}

}  // namespace

// Every op here has a float32 and a bfloat16 kernel.
#define REGISTER_FLOAT_AND_BFLOAT16(name, Op)                                            \
  REGISTER_KERNEL_BUILDER(Name(name).Device(DEVICE_CPU).TypeConstraint<float>("T"),      \
                          Op<F32>);                                                      \
  REGISTER_KERNEL_BUILDER(Name(name).Device(DEVICE_CPU).TypeConstraint<Eigen::bfloat16>("T"), \
                          Op<BF16>)

// dx = dy * g(x) over float32 values, g rounded to the tensors' dtype D first (as the
// reference computes it); dxs may be dys.
template <typename D>
inline void reste_product(const float* xs, const float* dys, float* dxs, int64_t n, float e,
                          float inv_o, float t, float interval) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float ax = std::fabs(xs[i]);
    // max(|x|, interval) keeps the log finite and gives interval^e inside interval
    const float power = exp_clamped(e * log_pos(ax > interval ? ax : interval));
    const float slope = ax <= interval ? power : power * inv_o;
    dxs[i] = dys[i] * D::round(ax <= t ? slope : 0.0f);
  }
}

// The elementwise backward ops' inputs: x and dy of one shape, then a scalar (dx has
// dy's shape).
Status ElementwiseShape(shape_inference::InferenceContext* c) {
  shape_inference::ShapeHandle shape;
  TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &shape));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 0, &shape));
  c->set_output(0, c->input(1));
  return OkStatus();
}

Status CheckElementwise(OpKernelContext* ctx) {
  const Tensor& x = ctx->input(0);
  const Tensor& dy = ctx->input(1);
  if (x.shape() != dy.shape()) {
    return errors::InvalidArgument("x and dy differ in shape: ", x.shape().DebugString(),
                                   " and ", dy.shape().DebugString());
  }
  if (!TensorShapeUtils::IsScalar(ctx->input(2).shape())) {
    return errors::InvalidArgument("the third input must be a scalar");
  }
  return OkStatus();
}

// ------------------------------------------------------------------------------- sign
// y = larq.math.sign(x) = sign(sign(x) + 0.1): -1 where x < 0, NaN where x is NaN, +1
// elsewhere (0 and -0 included), in one pass where Larq's form takes three. Used only
// by training steps (`training=True`); the graphs LCE converts keep Larq's form.
REGISTER_OP("BinarySign")
    .Input("x: T")
    .Attr("T: {float, bfloat16}")
    .Output("y: T")
    .SetShapeFn(shape_inference::UnchangedShape);

template <typename D>
class BinarySignOp : public OpKernel {
 public:
  explicit BinarySignOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &y));
    using Int = typename D::Int;
    const auto* xp = bits<D>(x);
    // selects on the integer bits, every value read unconditionally: without AVX-512's
    // masks a conditional read is control flow, and the loop stays scalar
    const auto* xi = reinterpret_cast<const Int*>(xp);
    auto* out = reinterpret_cast<Int*>(bits<D>(y));
    Int one, minus_one;
    const auto one_bits = D::store(1.0f), minus_one_bits = D::store(-1.0f);
    std::memcpy(&one, &one_bits, sizeof(Int));
    std::memcpy(&minus_one, &minus_one_bits, sizeof(Int));
    auto work = [=](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const float v = D::load(xp[i]);
        // as masks, not selects: GCC leaves mixed-width selects (bfloat16) scalar
        const Int negative = static_cast<Int>(-static_cast<Int>(v < 0.0f));
        const Int nan = static_cast<Int>(-static_cast<Int>(v != v));
        const Int sign = (minus_one & negative) | (one & ~negative);
        out[i] = (xi[i] & nan) | (sign & ~nan);  // NaN stays NaN, its bits kept (TF's Sign)
      }
    };
    ParallelFor(ctx, x.NumElements(), /*cost_per_unit=*/2, work);
  }
};
REGISTER_FLOAT_AND_BFLOAT16("BinarySign", BinarySignOp);

// ------------------------------------------------------------------------------ ReSTE
// dx = dy * g(x): g = (1/o) |x|^((1-o)/o) on interval < |x| <= t, interval^((1-o)/o)
// on |x| <= interval, 0 beyond t (reste_larq.quantizers.reste_gradient). g is computed
// in float32 for every dtype and rounded to x's dtype before the product, as the XLA
// kernel computes it (`_compute_dtype`, then `dy * cast(g, dy.dtype)`).
REGISTER_OP("ResteGrad")
    .Input("x: T")
    .Input("dy: T")
    .Input("o: float")
    .Attr("t: float")
    .Attr("interval: float")
    .Attr("T: {float, bfloat16}")
    .Output("dx: T")
    .SetShapeFn(ElementwiseShape);

template <typename D>
class ResteGradOp : public OpKernel {
 public:
  explicit ResteGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("t", &t_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("interval", &interval_));
    OP_REQUIRES(ctx, interval_ > 0.0f, errors::InvalidArgument("interval must be > 0"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckElementwise(ctx));
    const float o = ctx->input(2).scalar<float>()();
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({1}, 0, dy.shape(), &dx));
    const auto* xp = bits<D>(x);
    const auto* dyp = bits<D>(dy);
    auto* out = bits<D>(dx);
    const float e = (1.0f - o) / o, inv_o = 1.0f / o, t = t_, interval = interval_;
    auto work = [=](int64_t begin, int64_t end) {
      if constexpr (std::is_same<D, F32>::value) {
        reste_product<D>(xp + begin, dyp + begin, out + begin, end - begin, e, inv_o, t, interval);
      } else {
        // through float32 buffers: each of the three loops vectorizes on its own
        constexpr int64_t kChunk = 1024;
        alignas(64) float xs[kChunk], dys[kChunk];
        for (int64_t b = begin; b < end; b += kChunk) {
          const int64_t n = std::min(kChunk, end - b);
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            xs[i] = D::load(xp[b + i]);
            dys[i] = D::load(dyp[b + i]);
          }
          reste_product<D>(xs, dys, dys, n, e, inv_o, t, interval);
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) out[b + i] = D::store(dys[i]);
        }
      }
    };
    ParallelFor(ctx, x.NumElements(), /*cost_per_unit=*/40, work);
  }

 private:
  float t_, interval_;
};
REGISTER_FLOAT_AND_BFLOAT16("ResteGrad", ResteGradOp);

// -------------------------------------------------------------------------------- STE
// dx = dy where |x| <= clip, else 0: Larq's `_clipped_gradient` (a select, so the same
// bits), with clip given in x's dtype as Larq converts it. float16 keeps the XLA and
// TensorFlow kernels (no vectorized conversion here; it is a GPU dtype).
REGISTER_OP("SteGrad")
    .Input("x: T")
    .Input("dy: T")
    .Input("clip: T")
    .Attr("T: {float, bfloat16}")
    .Output("dx: T")
    .SetShapeFn(ElementwiseShape);

template <typename D>
class SteGradOp : public OpKernel {
 public:
  explicit SteGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckElementwise(ctx));
    // bfloat16 -> float is exact, so comparing in float is comparing in bfloat16 (and,
    // as in TensorFlow's own kernels, with denormals read as zero)
    const float clip = D::load(bits<D>(ctx->input(2))[0]);
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({1}, 0, dy.shape(), &dx));
    const auto* xp = bits<D>(x);
    // dy's bits, read whatever the mask (a conditional read vectorizes as a gather)
    const auto* dyp = reinterpret_cast<const typename D::Int*>(bits<D>(dy));
    auto* out = reinterpret_cast<typename D::Int*>(bits<D>(dx));
    auto work = [=](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const typename D::Int keep = std::fabs(D::load(xp[i])) <= clip ? D::kAll : 0;
        out[i] = dyp[i] & keep;  // dy or +0, as Larq's select
      }
    };
    ParallelFor(ctx, x.NumElements(), /*cost_per_unit=*/4, work);
  }
};
REGISTER_FLOAT_AND_BFLOAT16("SteGrad", SteGradOp);

// ----------------------------------------------------------------- one-padding border
// (row, column) of each border position of an h x w output, in `_border_sums`' order:
// the top rt rows, the bottom rb rows, then the left cl and right cr columns of the rows
// between, each row-major.
std::vector<std::pair<int64_t, int64_t>> BorderPositions(int64_t h, int64_t w, int64_t rt,
                                                         int64_t rb, int64_t cl, int64_t cr) {
  std::vector<std::pair<int64_t, int64_t>> at;
  for (int64_t r = 0; r < rt; ++r)
    for (int64_t q = 0; q < w; ++q) at.emplace_back(r, q);
  for (int64_t r = h - rb; r < h; ++r)
    for (int64_t q = 0; q < w; ++q) at.emplace_back(r, q);
  for (int64_t r = rt; r < h - rb; ++r)
    for (int64_t q = 0; q < cl; ++q) at.emplace_back(r, q);
  for (int64_t r = rt; r < h - rb; ++r)
    for (int64_t q = w - cr; q < w; ++q) at.emplace_back(r, q);
  return at;
}

Status BorderAttrs(shape_inference::InferenceContext* c, int* rt, int* rb, int* cl, int* cr) {
  TF_RETURN_IF_ERROR(c->GetAttr("rt", rt));
  TF_RETURN_IF_ERROR(c->GetAttr("rb", rb));
  TF_RETURN_IF_ERROR(c->GetAttr("cl", cl));
  return c->GetAttr("cr", cr);
}

// The gradient of OnePaddedQuantConv2D's border term (reste_larq.layers): dy summed over
// the batch at the border positions only, in `BorderPositions`' order. Summed in
// float32, returned in dy's dtype. It reads the border strips in place (TensorFlow's
// strided slices would copy them first).
REGISTER_OP("BorderSums")
    .Input("dy: T")
    .Attr("rt: int >= 0")
    .Attr("rb: int >= 0")
    .Attr("cl: int >= 0")
    .Attr("cr: int >= 0")
    .Attr("T: {float, bfloat16}")
    .Output("sums: T")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle dy;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &dy));
      int rt, rb, cl, cr;
      TF_RETURN_IF_ERROR(BorderAttrs(c, &rt, &rb, &cl, &cr));
      auto h = c->Value(c->Dim(dy, 1)), w = c->Value(c->Dim(dy, 2));
      auto positions = (h < 0 || w < 0) ? c->UnknownDim()
                                         : c->MakeDim((rt + rb) * w + (h - rt - rb) * (cl + cr));
      c->set_output(0, c->MakeShape({positions, c->Dim(dy, 3)}));
      return OkStatus();
    });

// The border ops' strips (attributes rt, rb, cl, cr) and their positions in a tensor.
class BorderOp : public OpKernel {
 public:
  explicit BorderOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("rt", &rt_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("rb", &rb_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("cl", &cl_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("cr", &cr_));
  }

 protected:
  // An NHWC tensor's sizes and its border positions, in `BorderPositions`' order.
  struct Border {
    int64_t n, h, w, c, positions;
    std::vector<std::pair<int64_t, int64_t>> at;
  };

  // The border of t (NHWC, called `name` in errors).
  Status Positions(const Tensor& t, const char* name, Border* border) const {
    if (t.dims() != 4) return errors::InvalidArgument(name, " must be NHWC");
    const int64_t h = t.dim_size(1), w = t.dim_size(2);
    if (rt_ + rb_ > h || cl_ + cr_ > w) {
      return errors::InvalidArgument("border strips larger than ", name, ": ",
                                     t.shape().DebugString());
    }
    border->n = t.dim_size(0), border->h = h, border->w = w, border->c = t.dim_size(3);
    border->at = BorderPositions(h, w, rt_, rb_, cl_, cr_);
    border->positions = static_cast<int64_t>(border->at.size());
    return OkStatus();
  }

  int rt_, rb_, cl_, cr_;
};

template <typename D>
class BorderSumsOp : public BorderOp {
 public:
  explicit BorderSumsOp(OpKernelConstruction* ctx) : BorderOp(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    Border border;
    OP_REQUIRES_OK(ctx, Positions(dy, "dy", &border));
    const int64_t n = border.n, h = border.h, w = border.w, c = border.c;
    const int64_t positions = border.positions;
    Tensor* sums = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({positions, c}), &sums));
    const auto* dyp = bits<D>(dy);
    auto* out = bits<D>(sums);
    const auto* where = border.at.data();
    auto work = [=](int64_t begin, int64_t end) {
      std::vector<float> acc(c);
      for (int64_t p = begin; p < end; ++p) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        const int64_t offset = (where[p].first * w + where[p].second) * c;
        for (int64_t b = 0; b < n; ++b) {
          const auto* row = dyp + b * h * w * c + offset;
#pragma omp simd
          for (int64_t k = 0; k < c; ++k) acc[k] += D::load(row[k]);
        }
        for (int64_t k = 0; k < c; ++k) out[p * c + k] = D::store(acc[k]);
      }
    };
    ParallelFor(ctx, positions, /*cost_per_unit=*/n * c, work);
  }
};
REGISTER_FLOAT_AND_BFLOAT16("BorderSums", BorderSumsOp);

// The one-padded convs' border term, forward: outputs + values at the border positions
// of every image (values [positions, channels], positions in `BorderPositions`' order),
// outputs elsewhere. It writes into the convolution's output buffer where TensorFlow
// allows it, so it touches the border strips only; the scatter and broadcast add it
// replaces (`_add_at_border`) made a full pass over the output. Added in float32 and
// rounded to T, as TensorFlow's add. The one difference: inside, a -0 output stays -0
// where `outputs + 0` gives +0 (equal values).
REGISTER_OP("AddAtBorder")
    .Input("outputs: T")
    .Input("values: T")
    .Attr("rt: int >= 0")
    .Attr("rb: int >= 0")
    .Attr("cl: int >= 0")
    .Attr("cr: int >= 0")
    .Attr("T: {float, bfloat16}")
    .Output("result: T")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle outputs, values;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &outputs));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &values));
      c->set_output(0, outputs);
      return OkStatus();
    });

template <typename D>
class AddAtBorderOp : public BorderOp {
 public:
  explicit AddAtBorderOp(OpKernelConstruction* ctx) : BorderOp(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& in = ctx->input(0);
    const Tensor& values = ctx->input(1);
    Border border;
    OP_REQUIRES_OK(ctx, Positions(in, "outputs", &border));
    const int64_t n = border.n, h = border.h, w = border.w, c = border.c;
    const int64_t positions = border.positions;
    OP_REQUIRES(ctx,
                values.dims() == 2 && values.dim_size(0) == positions && values.dim_size(1) == c,
                errors::InvalidArgument("values must have shape [", positions, ", ", c,
                                        "], got ", values.shape().DebugString()));
    Tensor* result = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, in.shape(), &result));
    const auto* src = bits<D>(in);
    auto* out = bits<D>(result);
    if (out != src) {  // not forwarded: copy, then add at the border
      ParallelFor(ctx, in.NumElements(), /*cost_per_unit=*/1, [=](int64_t begin, int64_t end) {
        std::memcpy(out + begin, src + begin, (end - begin) * sizeof(*src));
      });
    }
    const auto* vp = bits<D>(values);
    const auto* where = border.at.data();
    auto work = [=](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t b = j / positions, p = j % positions;
        auto* row = out + (b * h * w + where[p].first * w + where[p].second) * c;
        const auto* v = vp + p * c;
#pragma omp simd
        for (int64_t k = 0; k < c; ++k) row[k] = D::store(D::load(row[k]) + D::load(v[k]));
      }
    };
    ParallelFor(ctx, n * positions, /*cost_per_unit=*/c, work);
  }
};
REGISTER_FLOAT_AND_BFLOAT16("AddAtBorder", AddAtBorderOp);
