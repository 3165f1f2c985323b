// y = x w^T for float32 activations and an int4 weight in torch's CPU packing, on AVX2 CPUs.
//
// Why (quantized.py decides where it is used): torch's CPU int4 kernel
// (aten::_weight_int4pack_mm_for_cpu) computes in bf16. A CPU without native bf16 (AVX2, no
// AVX512-BF16 or AMX) widens bf16 to float32 piece by piece, so on such a CPU int4 decoded only
// 1.55x float32 at batch 1 and 1.23x at batch 8 (SmolLM2-135M, AMD EPYC, benchmarks/RESULTS.md),
// well short of what reading an eighth of the bytes allows. This kernel reads the same packed
// bytes and multiplies float32 rows with FMAs: the weights' memory traffic is the int4 bytes,
// the arithmetic float32's (SmolLM2's 210 layers at one row: 9.1 ms against torch's 20.2 and
// float32's 35.9; at eight rows 41 against 51 and 43, where decoding the codes costs about as
// much as the FMAs).
//
// Layout read (checked by quantized._layout() against a packed probe before this is used):
// blocks of B output rows (B = 32 on torch's AVX2 build, 64 on its AVX512 one), each [K, B/2]
// bytes whose byte j holds row j in its low nibble and row B/2 + j in its high one. Scales are
// bf16 [K/g, N, 2] (scale, zero), w = (q - 8) * scale + zero. Sixteen bytes of one k give 32
// output columns (16 low, 16 high): one work item. One or two rows decode each k's codes in
// registers (direct); more rows decode a panel of 128 k's codes into L1 and run tiles of 6 rows
// over it (panelled).
//
// Arithmetic, the same in both paths: per group of g inputs, acc = the chain of fma(x, q) over
// the group's k in order (from zero), then y = fma(zero - 8 * scale, sum of the group's x,
// fma(scale, acc, y)), from y = 0. So every output element is the same computation whatever
// the path, tile or thread computing it: a row's result does not depend on how many other rows
// are in the call nor on the thread count. With a one-hot row it is fma(q, scale, zero - 8 *
// scale), bit for bit quantized._dequantize_int4's float32 weight (q * scale is exact: 4 bits
// times bf16's 8), which int4_dequantize also writes out.
//
//   x [M, K] float32 (any leading shape)   packed uint8 [N, K/2]   scales bf16 [K/g, N, 2]
//   returns [..., N] float32.  Needs AVX2 and FMA (the build is -march=native).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

constexpr int64_t COLS = 32;  // output columns per work item (16 low nibbles, 16 high)
constexpr int64_t PANEL_K = 128;  // k per panel (at least one group): 128 x 32 floats = 16 KB, in L1
constexpr int DIRECT_ROWS = 2;  // up to this many rows, decode each k's codes in registers (3 spill)
constexpr int TILE_ROWS = 6;  // beyond: 6 rows x 16 columns per tile over a decoded panel

// 32 codes of one k as floats: rows lo..lo+7, lo+8..lo+15, hi..hi+7, hi+8..hi+15. Each 8 bytes are
// widened to 32-bit lanes straight from memory, then split into their low and high nibbles in
// the lanes: 2 shuffles for 32 codes instead of 6.
inline void decode(const uint8_t* bytes, __m256 q[4]) {
  const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8)));
  const __m256i nibble = _mm256_set1_epi32(0x0F);
  q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v0, nibble));
  q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(v1, nibble));
  q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
  q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
}

// scale and zero - 8 * scale of 8 columns from their bf16 (scale, zero) pairs
inline void scale_offset(const uint16_t* pairs, __m256& s, __m256& o) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs));
  s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  const __m256 z = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  o = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z);  // 8 * s is exact: one rounding
}

// What every output element does at the end of each group of g inputs, the same in both paths:
// y = fma(offset, sum of the group's x, fma(scale, sum of x * q, y)), from y = 0.
inline void fold(float* y, __m256 acc, const uint16_t* pairs, float xsum, bool first) {
  __m256 s, o;
  scale_offset(pairs, s, o);
  __m256 v = _mm256_fmadd_ps(s, acc, first ? _mm256_setzero_ps() : _mm256_loadu_ps(y));
  _mm256_storeu_ps(y, _mm256_fmadd_ps(o, _mm256_set1_ps(xsum), v));
}

struct Item {  // one work item: 32 output columns of one packing block
  const uint8_t* codes;  // its bytes of k = 0 (16 of them), `stride` bytes per k
  int64_t stride, lo, hi;  // first row of its low and of its high nibbles
  int64_t col(int v) const { return v < 2 ? lo + 8 * v : hi + 8 * (v - 2); }

  // item i of a packing with blocks of `block` rows: unit i % (block / 32) of block i / (block / 32)
  static Item at(const uint8_t* codes, int64_t K, int64_t block, int64_t i) {
    const int64_t b = i / (block / COLS), u = i % (block / COLS);
    return Item{codes + b * block * (K / 2) + 16 * u, block / 2, b * block + 16 * u, b * block + block / 2 + 16 * u};
  }
};

struct Call {
  const float* x;  // [M, K]
  const float* xt;  // the panel path's x: the rows of each tile of TILE_ROWS (fewer in the last) as [K][rows]
  const float* xsum;  // [M, K / g]: each group's sum of x, per row
  const uint16_t* scales;  // bf16 [K / g, N, 2]
  float* y;  // [M, N]
  int64_t M, K, N, g;
  const uint16_t* pairs(int64_t group, int64_t col) const { return scales + (group * N + col) * 2; }
};

// R (<= DIRECT_ROWS) rows from the codes, each k's 32 codes decoded once in registers
template <int R>
void direct(const Call& c, const Item& it, int64_t m) {
  const int64_t G = c.K / c.g;
  for (int64_t gi = 0; gi < G; ++gi) {
    __m256 acc[R][4];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_setzero_ps();
    for (int64_t k = gi * c.g; k < (gi + 1) * c.g; ++k) {
      __m256 q[4];
      decode(it.codes + k * it.stride, q);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_broadcast_ss(c.x + (m + r) * c.K + k);
#pragma GCC unroll 8
        for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_fmadd_ps(xb, q[v], acc[r][v]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < 4; ++v)
        fold(c.y + (m + r) * c.N + it.col(v), acc[r][v], c.pairs(gi, it.col(v)), c.xsum[(m + r) * G + gi], gi == 0);
  }
}

// R rows x the 16 columns of half h over a decoded panel of k in [k0, k0 + kc); xt is the R
// rows' x laid out [K][R] (one pointer for all the broadcasts)
template <int R>
void tile(const Call& c, const Item& it, const float* panel, int64_t k0, int64_t kc, int h, int64_t m,
          const float* xt) {
  const int64_t G = c.K / c.g;
  for (int64_t gi = k0 / c.g; gi < (k0 + kc) / c.g; ++gi) {
    __m256 acc[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const float* p = panel + (gi * c.g - k0) * COLS + 16 * h;
    const float* xk = xt + gi * c.g * R;
    for (int64_t k = 0; k < c.g; ++k, p += COLS, xk += R) {
      __m256 w0 = _mm256_loadu_ps(p), w1 = _mm256_loadu_ps(p + 8);
      __asm__("" : "+x"(w0), "+x"(w1));  // in registers: not a load folded into every FMA
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_broadcast_ss(xk + r);
        acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < 2; ++v) {
        const int64_t col = it.col(2 * h + v);
        fold(c.y + (m + r) * c.N + col, acc[r][v], c.pairs(gi, col), c.xsum[(m + r) * G + gi], gi == 0);
      }
  }
}

template <int R>
void tiles(const Call& c, const Item& it, const float* panel, int64_t k0, int64_t kc, int64_t m) {
  const float* xt = c.xt + m * c.K;
  tile<R>(c, it, panel, k0, kc, 0, m, xt);
  tile<R>(c, it, panel, k0, kc, 1, m, xt);
}

// all M rows over one item's panels (M > DIRECT_ROWS)
void panelled(const Call& c, const Item& it, float* panel) {
  const int64_t step = std::max(PANEL_K / c.g, int64_t(1)) * c.g;
  for (int64_t k0 = 0; k0 < c.K; k0 += step) {
    const int64_t kc = std::min(step, c.K - k0);
    for (int64_t k = 0; k < kc; ++k) {
      __m256 q[4];
      decode(it.codes + (k0 + k) * it.stride, q);
#pragma GCC unroll 8
      for (int v = 0; v < 4; ++v) _mm256_storeu_ps(panel + k * COLS + 8 * v, q[v]);
    }
    int64_t m = 0;
    for (; m + TILE_ROWS <= c.M; m += TILE_ROWS) tiles<TILE_ROWS>(c, it, panel, k0, kc, m);
    switch (c.M - m) {
      case 5: tiles<5>(c, it, panel, k0, kc, m); break;
      case 4: tiles<4>(c, it, panel, k0, kc, m); break;
      case 3: tiles<3>(c, it, panel, k0, kc, m); break;
      case 2: tiles<2>(c, it, panel, k0, kc, m); break;
      case 1: tiles<1>(c, it, panel, k0, kc, m); break;
      default: break;
    }
  }
}

// Ask for the next item's scales ahead of use: a line per group for its 16 low columns and one
// for its 16 high ones, N * 4 bytes apart. Seen over a call, each group's scales are a stream
// of its own (18-48 of them), more than the hardware prefetcher follows; the codes are one
// contiguous stream it does follow.
void ask_ahead(const Call& c, const Item& next) {
  for (int64_t gi = 0; gi < c.K / c.g; ++gi) {
    _mm_prefetch(reinterpret_cast<const char*>(c.pairs(gi, next.lo)), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c.pairs(gi, next.hi)), _MM_HINT_T0);
  }
}

// x [M, K] -> for each tile of TILE_ROWS rows (the last one what is left), its rows as [K][rows]
void pack_tiles(const float* x, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; m += TILE_ROWS) {
    const int64_t R = std::min<int64_t>(TILE_ROWS, M - m);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k) out[m * K + k * R + r] = x[(m + r) * K + k];
  }
}

// each row's group sums of x, in one fixed order (so a row's are the same in any call)
void group_sums(const float* x, int64_t M, int64_t K, int64_t g, float* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t gi = 0; gi < K / g; ++gi) {
      __m256 a = _mm256_setzero_ps();
      const float* p = x + m * K + gi * g;
      for (int64_t k = 0; k < g; k += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(p + k));
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      out[m * (K / g) + gi] = _mm_cvtss_f32(s);
    }
}

// (N, K) of a packed weight, after checking it and its scales (errors name what is wrong)
std::pair<int64_t, int64_t> checked_shape(const torch::Tensor& packed, const torch::Tensor& scales, int64_t group_size,
                                          int64_t block) {
  TORCH_CHECK(packed.device().is_cpu() && scales.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(packed.scalar_type() == torch::kByte && packed.dim() == 2 && packed.is_contiguous(),
              "packed must be a contiguous uint8 [N, K/2]");
  TORCH_CHECK(block == 32 || block == 64, "block must be 32 or 64, got ", block);
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(N % block == 0, "out_features ", N, " is not a multiple of the packing's block ", block);
  TORCH_CHECK(group_size >= 8 && group_size % 8 == 0 && K % group_size == 0, "group_size ", group_size,
              " does not divide K = ", K);
  TORCH_CHECK(scales.scalar_type() == torch::kBFloat16 && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == K / group_size && scales.size(1) == N && scales.size(2) == 2,
              "scales must be a contiguous bf16 [K/g, N, 2]");
  return {N, K};
}

torch::Tensor int4_rows_linear(const torch::Tensor& x_in, const torch::Tensor& packed, const torch::Tensor& scales,
                               int64_t group_size, int64_t block) {
  TORCH_CHECK(x_in.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat, "x must be float32");
  const auto shape = checked_shape(packed, scales, group_size, block);
  const int64_t N = shape.first, K = shape.second;
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, "x's last dimension is ", x_in.size(-1), ", the weight has ", K,
              " inputs");
  auto x = x_in.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = torch::empty(sizes, x.options());
  const int64_t M = N ? y.numel() / N : 0;
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  auto xsum = torch::empty({M, K / group_size}, x.options());
  group_sums(xp, M, K, group_size, xsum.data_ptr<float>());
  torch::Tensor xt;
  if (M > DIRECT_ROWS) {
    xt = torch::empty({M, K}, x.options());
    pack_tiles(xp, M, K, xt.data_ptr<float>());
  }
  const Call c{xp, M > DIRECT_ROWS ? xt.data_ptr<float>() : nullptr, xsum.data_ptr<float>(), sp, yp, M, K, N, group_size};
  at::parallel_for(0, N / COLS, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> panel(M > DIRECT_ROWS ? std::max(PANEL_K, group_size) * COLS : 0);
    for (int64_t item = i0; item < i1; ++item) {
      const Item it = Item::at(cp, K, block, item);
      if (item + 1 < i1) ask_ahead(c, Item::at(cp, K, block, item + 1));
      if (M > DIRECT_ROWS) {
        panelled(c, it, panel.data());
        continue;
      }
      if (M == 2)
        direct<2>(c, it, 0);
      else
        direct<1>(c, it, 0);
    }
  });
  return y;
}

// The weight [N, K] in float32, each element fma(q, scale, zero - 8 * scale): the same bits as
// quantized._dequantize_int4 (and as the one-hot rows of int4_rows_linear), for GEMMs on many
// rows (a prefill, a training step's input gradient). Decoded 32 columns x PANEL_K k at a time
// into L1, then written out row by row.
torch::Tensor int4_dequantize(const torch::Tensor& packed, const torch::Tensor& scales, int64_t group_size,
                              int64_t block) {
  const auto shape = checked_shape(packed, scales, group_size, block);
  const int64_t N = shape.first, K = shape.second;
  auto w = torch::empty({N, K}, torch::kFloat);
  if (N == 0 || K == 0) return w;
  const uint8_t* cp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N / COLS, 1, [&](int64_t i0, int64_t i1) {
    alignas(32) float panel[PANEL_K * COLS];
    for (int64_t item = i0; item < i1; ++item) {
      const Item it = Item::at(cp, K, block, item);
      __m256 s[4], o[4];
      for (int64_t k0 = 0; k0 < K; k0 += PANEL_K) {
        const int64_t kc = std::min(PANEL_K, K - k0);
        for (int64_t k = 0; k < kc; ++k) {
          const int64_t kk = k0 + k;
          if (k == 0 || kk % group_size == 0)
#pragma GCC unroll 4
            for (int v = 0; v < 4; ++v) scale_offset(sp + ((kk / group_size) * N + it.col(v)) * 2, s[v], o[v]);
          __m256 q[4];
          decode(it.codes + kk * it.stride, q);
#pragma GCC unroll 4
          for (int v = 0; v < 4; ++v) _mm256_store_ps(panel + k * COLS + 8 * v, _mm256_fmadd_ps(q[v], s[v], o[v]));
        }
        for (int j = 0; j < COLS; ++j) {
          float* row = wp + it.col(j / 8) * K + (j % 8) * K + k0;
          for (int64_t k = 0; k < kc; ++k) row[k] = panel[k * COLS + j];
        }
      }
    }
  });
  return w;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_rows_linear", &int4_rows_linear, "x w^T for float32 rows and an int4 weight in torch's CPU packing",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("int4_dequantize", &int4_dequantize, "the float32 weight [N, K] of torch's CPU int4 packing",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
