// y = x w^T for float32 activations and an int8 weight with one float32 scale per group of
// inputs (or per output row), on AVX2 CPUs.
//
// Why (quantized.py decides where it is used): torch's int8 CPU kernel
// (torch._weight_int8pack_mm) takes one scale per output row only and computes in bf16, which a
// CPU without native bf16 widens piece by piece. A GGUF file's Q8_0 tensors (SmolLM2's tied
// embedding and LM head: 49,152 x 576) hold one scale per 32 inputs, and their weight d * q is
// exactly the float32 model's (an int8 times a float16 fits float32's mantissa). So the head can
// stay as the file stores it, a quarter of float32's bytes, with the same weights: at one row a
// decode step reads 28 MB instead of 113.
//
// Arithmetic: each weight is formed as float(q) * scale (exactly the float32 model's weight),
// then every output is one chain of FMAs over its inputs in order, 8 lanes wide (lane l holds
// inputs k = l mod 8), from zero, summed across lanes in one fixed order at the end. Every
// output element is that same computation whatever the path, tile or thread computing it, so a
// row's result does not depend on the other rows of the call nor on the thread count.
//
// Work: blocks of 16 outputs; within a block, groups of up to 4 rows, each forming every 8
// weights in registers (float(q) * scale: 3 instructions shared by the group's rows) and
// feeding one FMA per row. The block's int8 weights (16 x K bytes) stay in L1 from one row group
// to the next. On the 2-core AMD EPYC (Zen 4) with SmolLM2's head, one thread: 2.7 ms at one row
// against 7.7 for float32 prepacked for oneDNN and 9.5 for F.linear; 4.0 against 5.7 at four
// rows; even at eight (7.7 against 8.1); 0.7x float32's speed from 16 rows, where forming the
// weights costs more than the bytes it saves (serve/lm_head.py chooses by rows). Forming each
// block's weights once into an L1 panel for all rows was slower here at every count (1-32 rows).
//
//   x [M, K] float32 (any leading shape)   q int8 [N, K]   scales float32 [N, K / g]
//   returns [..., N] float32.  g: a multiple of 8 dividing K.  Needs AVX2 and FMA (-march=native).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int BLOCK = 16;  // outputs per work item: their int8 weights stay in L1 across row groups
constexpr int ROWS = 4;  // rows per group: 4 x 2 outputs of accumulators (see outputs())

struct Call {
  const float* x;  // [M, K]
  const int8_t* q;  // [N, K]
  const float* scales;  // [N, G]
  float* y;  // [M, N]
  int64_t M, K, N, G, g;
};

// 8 weights of output n from input k: float(q) * s, s the scale of k's group (broadcast)
inline __m256 weights8(const Call& c, int64_t n, int64_t k, __m256 s) {
  const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c.q + n * c.K + k)));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(q), s);
}

inline __m256 scale(const Call& c, int64_t n, int64_t group) { return _mm256_broadcast_ss(c.scales + n * c.G + group); }

// the lanes' sum in one fixed order
inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// output n's K weights, formed, into out (int8_dequantize)
inline void form(const Call& c, int64_t n, float* out) {
  for (int64_t gi = 0; gi < c.G; ++gi) {
    const __m256 s = scale(c, n, gi);
    for (int64_t k = gi * c.g; k < (gi + 1) * c.g; k += 8) _mm256_storeu_ps(out + k, weights8(c, n, k, s));
  }
}

// R rows (from m) x B outputs (from n), each 8 weights formed once in registers. The next B
// outputs' weights are asked for ahead: B strided streams, K bytes apart.
template <int R, int B>
void direct(const Call& c, int64_t n, int64_t m) {
  __m256 acc[R][B];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < B; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < c.G; ++gi)
    for (int64_t k = gi * c.g; k < (gi + 1) * c.g; k += 8) {
      __m256 w[B];
      if ((k & 63) == 0)
#pragma GCC unroll 8
        for (int j = 0; j < B; ++j) _mm_prefetch(reinterpret_cast<const char*>(c.q + (n + B + j) * c.K + k), _MM_HINT_T0);
#pragma GCC unroll 8
      for (int j = 0; j < B; ++j) w[j] = weights8(c, n + j, k, scale(c, n + j, gi));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xr = _mm256_loadu_ps(c.x + (m + r) * c.K + k);
#pragma GCC unroll 8
        for (int j = 0; j < B; ++j) acc[r][j] = _mm256_fmadd_ps(xr, w[j], acc[r][j]);
      }
    }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < B; ++j) c.y[(m + r) * c.N + n + j] = hsum(acc[r][j]);
}

// R rows over `count` outputs from n, B at a time
template <int R, int B>
void direct_over(const Call& c, int64_t n, int64_t count, int64_t m) {
  int64_t j = 0;
  for (; j + B <= count; j += B) direct<R, B>(c, n + j, m);
  for (; j < count; ++j) direct<R, 1>(c, n + j, m);
}

// outputs [n, n + count) for every row (count <= BLOCK): groups of ROWS rows, then the rest.
// Each shape keeps at most 13 of the 16 registers: B weights, R x B accumulators, one x.
void outputs(const Call& c, int64_t n, int64_t count) {
  int64_t m = 0;
  for (; m + ROWS <= c.M; m += ROWS) direct_over<ROWS, 2>(c, n, count, m);
  switch (c.M - m) {
    case 1: return direct_over<1, 4>(c, n, count, m);
    case 2: return direct_over<2, 3>(c, n, count, m);
    case 3: return direct_over<3, 3>(c, n, count, m);
    default: return;
  }
}

// (N, K, G) of a weight and its scales, after checking them (errors name what is wrong)
std::vector<int64_t> checked_shape(const torch::Tensor& q, const torch::Tensor& scales) {
  TORCH_CHECK(q.device().is_cpu() && scales.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.scalar_type() == torch::kChar && q.dim() == 2 && q.is_contiguous(), "q must be a contiguous int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.dim() == 2 && scales.is_contiguous() &&
                  scales.size(0) == N && scales.size(1) >= 1,
              "scales must be a contiguous float32 [N, G] with N = ", N);
  const int64_t G = scales.size(1);
  TORCH_CHECK(K % G == 0 && (K / G) % 8 == 0, "K = ", K, " is not G = ", G, " groups of a multiple of 8 inputs");
  return {N, K, G};
}

torch::Tensor int8_rows_linear(const torch::Tensor& x_in, const torch::Tensor& q, const torch::Tensor& scales) {
  TORCH_CHECK(x_in.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat, "x must be float32");
  const auto shape = checked_shape(q, scales);
  const int64_t N = shape[0], K = shape[1], G = shape[2];
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, "x's last dimension is ", x_in.size(-1), ", the weight has ", K,
              " inputs");
  auto x = x_in.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = torch::empty(sizes, x.options());
  const int64_t M = N ? y.numel() / N : 0;
  if (M == 0 || N == 0) return y;
  const Call c{x.data_ptr<float>(), q.data_ptr<int8_t>(), scales.data_ptr<float>(), y.data_ptr<float>(), M, K, N, G, K / G};
  const int64_t blocks = (N + BLOCK - 1) / BLOCK;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) outputs(c, b * BLOCK, std::min<int64_t>(BLOCK, N - b * BLOCK));
  });
  return y;
}

// The weight [N, K] in float32, float(q) * scale: what int8_rows_linear multiplies by (and the
// float32 model's weight for a GGUF Q8_0 tensor), for GEMMs on many rows.
torch::Tensor int8_dequantize(const torch::Tensor& q, const torch::Tensor& scales) {
  const auto shape = checked_shape(q, scales);
  const int64_t N = shape[0], K = shape[1], G = shape[2];
  auto w = torch::empty({N, K}, torch::kFloat);
  if (N == 0 || K == 0) return w;
  const Call c{nullptr, q.data_ptr<int8_t>(), scales.data_ptr<float>(), nullptr, 0, K, N, G, K / G};
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) form(c, n, wp + n * K);
  });
  return w;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_rows_linear", &int8_rows_linear, "x w^T for float32 rows and an int8 weight with float32 group scales",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("int8_dequantize", &int8_dequantize, "the float32 weight [N, K] of an int8 weight and its group scales",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
