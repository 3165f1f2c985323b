// y = x w^T + b for float32 activations with few rows (a decode step), reading w where it lies.
//
// Why a hand-written product (serve/layer_gemm.py builds it and decides where it is used): a
// decode step multiplies a handful of rows by every weight of the model. MKL's sgemm packs the
// weight into its own panel layout on every call, which is most of the work when there are 1-16
// rows to multiply it with (measured on a 2-core AMD EPYC, AVX2, one thread, over a whole model's
// layers: 1.1-2.4x faster at 1-16 rows, about even at 24-32, slower from 48). This kernel reads
// each weight row once, in place, as the dot products of nn.Linear's own layout: a tile of 4
// input rows x 3 weight rows keeps 12 sums in registers, 8 lanes each, so each 8-float step
// costs 7 loads for 12 FMAs.
//
// The model's weights (100-500 MB) do not fit in the caches, so a step streams every weight from
// memory once. The hardware prefetcher alone leaves memory idle while a block of weight rows
// already in L1 is multiplied by the second and later groups of rows; so each tile also touches
// the next block's cache lines, spread evenly over the passes over the current block (1.2-1.6x
// faster over a whole model's layers at 1-16 rows; at 8 rows within 25 % of a plain read).
//
// Every output element is the same computation whatever the tile that computes it (8 lane sums
// over k in order, the same horizontal sum, then the scalar tail): a row's result does not
// depend on how many other rows are in the call, nor on the thread count.
//
//   x [M, K] float32 (any leading shape, made contiguous)   w [N, K] float32 contiguous
//   b [N] float32 or None                                   returns [..., N]
// Needs AVX2 and FMA (the build is -march=native; layer_gemm.py checks before it loads).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// one output from its 8 lane sums: horizontal sum, the k tail, the bias
inline float finish(__m256 acc, const float* x, const float* w, int64_t k8, int64_t K, const float* b) {
  float s = hsum(acc);
  for (int64_t k = k8; k < K; ++k) s = std::fma(x[k], w[k], s);
  return b ? s + *b : s;
}

// Which cache lines of the next block of weight rows one pass over the current block asks for
// ahead of use: `count` lines from line `offset + k` of the block (rows of `head` floats asked
// for, counted row by row), `per` lines each 8-float step. The same for every block of a call
// (only the block's address differs), so it is worked out once per call: its divisions cost as
// much as a short tile.
struct Share {
  int64_t offset = 0, k = 0, count = 0;
  int per = 0;

  // pass p of `passes` over the current block takes its share of the next block's `rows` rows:
  // every pass keeps memory busy, not only the first (the later ones read the block from L1)
  static Share of(int64_t rows, int64_t K, int64_t head, int64_t p, int64_t passes) {
    if (rows <= 0 || passes <= 0 || K <= 0) return {};
    const int64_t per_row = (std::min(head, K) + 15) / 16, lines = rows * per_row;
    const int64_t first = lines * p / passes, count = lines * (p + 1) / passes - first;
    const int64_t steps = std::max<int64_t>(K / 8, 1);
    return {(first / per_row) * K, (first % per_row) * 16, count, static_cast<int>((count + steps - 1) / steps)};
  }

  // the shares of passes 0..passes-1 over blocks whose next block has `rows` rows
  static std::vector<Share> all(int64_t rows, int64_t K, int64_t head, int64_t passes) {
    std::vector<Share> out;
    for (int64_t p = 0; p < passes; ++p) out.push_back(of(rows, K, head, p, passes));
    return out;
  }
};

// A pass's prefetches in flight: into L1, `per` lines each 8-float step, until `left` is 0.
struct Ahead {
  const float* row = nullptr;  // the row of the next line asked for
  int64_t K = 0, head = 0, k = 0, left = 0;
  int per = 0;

  Ahead() = default;
  Ahead(const float* next, int64_t K_, int64_t head_, const Share& s)
      : row(next ? next + s.offset : nullptr), K(K_), head(std::min(head_, K_)), k(s.k),
        left(next ? s.count : 0), per(s.per) {}

  // one 8-float step's lines, each given to `use` (the prefetch; a test's record)
  template <class Use>
  inline void step(Use use) {
    for (int q = 0; q < per && left > 0; ++q, --left) {
      use(row + k);
      if ((k += 16) >= head) k = 0, row += K;
    }
  }

  inline void step() {
    step([](const float* line) { _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T0); });
  }
};

// At one row the hardware prefetcher keeps up with long rows once it has caught on: software asks
// for rows of up to 512 floats whole, and for the first 128 floats of longer ones (measured at one
// row, 21 interleaved sweeps: rows of 1,344 floats asked for whole were 1.2x slower than none,
// their first 128 floats 1.1x faster than none; rows of 512 whole 1.1x faster than none)
inline int64_t head_of(int64_t K) { return K <= 512 ? K : 128; }

// The main tile, written out: 4 rows of x against 3 rows of w, 12 sums in registers. (GCC folds
// the loads of a generic template's unrolled arrays into every FMA and spills the sums.)
void tile_4x3(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy, const float* b,
              Ahead ahead) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
  __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
  const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
  const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K;
  const int64_t k8 = K & ~int64_t(7);
  for (int64_t k = 0; k < k8; k += 8) {
    ahead.step();
    const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k), v2 = _mm256_loadu_ps(w2 + k);
    __m256 u = _mm256_loadu_ps(x0 + k);
    a00 = _mm256_fmadd_ps(u, v0, a00), a01 = _mm256_fmadd_ps(u, v1, a01), a02 = _mm256_fmadd_ps(u, v2, a02);
    u = _mm256_loadu_ps(x1 + k);
    a10 = _mm256_fmadd_ps(u, v0, a10), a11 = _mm256_fmadd_ps(u, v1, a11), a12 = _mm256_fmadd_ps(u, v2, a12);
    u = _mm256_loadu_ps(x2 + k);
    a20 = _mm256_fmadd_ps(u, v0, a20), a21 = _mm256_fmadd_ps(u, v1, a21), a22 = _mm256_fmadd_ps(u, v2, a22);
    u = _mm256_loadu_ps(x3 + k);
    a30 = _mm256_fmadd_ps(u, v0, a30), a31 = _mm256_fmadd_ps(u, v1, a31), a32 = _mm256_fmadd_ps(u, v2, a32);
  }
  const __m256 acc[4][3] = {{a00, a01, a02}, {a10, a11, a12}, {a20, a21, a22}, {a30, a31, a32}};
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j) y[i * ldy + j] = finish(acc[i][j], x + i * ldx, w + j * K, k8, K, b ? b + j : nullptr);
}

// Edge tiles (MB rows of x, NB rows of w; at most 8 sums): the same arithmetic per output.
template <int MB, int NB>
void tile(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy, const float* b,
          Ahead ahead = {}) {
  __m256 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t k8 = K & ~int64_t(7);
  for (int64_t k = 0; k < k8; k += 8) {
    ahead.step();
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m256 u = _mm256_loadu_ps(x + i * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(u, _mm256_loadu_ps(w + j * K + k), acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) y[i * ldy + j] = finish(acc[i][j], x + i * ldx, w + j * K, k8, K, b ? b + j : nullptr);
}

// rows [0, M) of x against weight rows [n, n + NB) (NB <= 3): 4-row tiles, then the rest in one
// tile; the 4-row passes ask for the next block's rows ahead (from next; shares[p]: pass p's lines)
template <int NB>
void column_block(const float* x, int64_t M, const float* w, int64_t K, float* y, int64_t N, const float* b,
                  const float* next, const Share* shares) {
  int64_t m = 0;
  if constexpr (NB == 3)
    for (; m + 4 <= M; m += 4) tile_4x3(x + m * K, K, w, K, y + m * N, N, b, Ahead(next, K, K, shares[m / 4]));
  else
    for (; m + 4 <= M; m += 4) tile<4, NB>(x + m * K, K, w, K, y + m * N, N, b);
  switch (M - m) {  // the last 1-3 rows together: more independent sums than one row at a time
    case 3: tile<3, NB>(x + m * K, K, w, K, y + m * N, N, b); break;
    case 2: tile<2, NB>(x + m * K, K, w, K, y + m * N, N, b); break;
    case 1: tile<1, NB>(x + m * K, K, w, K, y + m * N, N, b); break;
  }
}

// fewer than 4 rows: each row against 8 weight rows at once (8 independent sums per row), every
// row of x against one block of weight rows before the next block (read from memory once)
void few(const float* x, int64_t M, const float* w, int64_t K, float* y, int64_t N, const float* b, int64_t n0,
         int64_t n1) {
  const std::vector<Share> full = Share::all(8, K, head_of(K), M);
  int64_t n = n0;
  for (; n + 8 <= n1; n += 8) {
    const float* next = w + (n + 8) * K;
    const int64_t next_rows = std::min(n + 16, n1) - (n + 8);
    const std::vector<Share> part = next_rows < 8 ? Share::all(next_rows, K, head_of(K), M) : std::vector<Share>();
    const Share* shares = next_rows < 8 ? part.data() : full.data();
    for (int64_t m = 0; m < M; ++m)
      tile<1, 8>(x + m * K, K, w + n * K, K, y + m * N + n, N, b ? b + n : nullptr,
                 Ahead(next, K, head_of(K), shares[m]));
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) tile<1, 1>(x + m * K, K, w + n * K, K, y + m * N + n, N, b ? b + n : nullptr);
}

torch::Tensor few_rows_linear(const torch::Tensor& x_in, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, "x and w must be float32");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w must be a contiguous [N, K] matrix");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == w.size(1), "x's last dimension is ", x_in.size(-1), ", w has ",
              w.size(1), " columns");
  const int64_t K = w.size(1), N = w.size(0);
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == torch::kFloat && b.dim() == 1 && b.size(0) == N, "bias must be float32 [N]");
    bp = b.data_ptr<float>();
  }
  auto x = x_in.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = torch::empty(sizes, x.options());
  const int64_t M = N ? y.numel() / N : 0;  // the rows (x.numel() / K fails when K is 0)
  if (M == 0 || N == 0) return y;
  if (K == 0) return bp ? y.copy_(b.expand_as(y)) : y.zero_();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M < 4) {
    at::parallel_for(0, (N + 7) / 8, 8, [&](int64_t lo, int64_t hi) {
      few(xp, M, wp, K, yp, N, bp, lo * 8, std::min(N, hi * 8));
    });
    return y;
  }
  const std::vector<Share> full = Share::all(3, K, K, M / 4);  // the next block: 3 rows ...
  const std::vector<Share> last = Share::all(N % 3, K, K, M / 4);  // ... or the last one's N % 3
  at::parallel_for(0, (N + 2) / 3, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t n = blk * 3, left = std::min<int64_t>(3, N - n);
      const float* bn = bp ? bp + n : nullptr;
      // the next block of this thread's range (none after its last: another thread reads that)
      const float* next = blk + 1 < hi ? wp + (n + 3) * K : nullptr;
      const Share* shares = n + 6 <= N ? full.data() : last.data();
      if (left == 3)
        column_block<3>(xp, M, wp + n * K, K, yp + n, N, bn, next, shares);
      else if (left == 2)
        column_block<2>(xp, M, wp + n * K, K, yp + n, N, bn, next, shares);
      else
        column_block<1>(xp, M, wp + n * K, K, yp + n, N, bn, next, shares);
    }
  });
  return y;
}

// For tests: the offsets (in floats, from the next block's start) of the lines that `passes`
// passes over a block ask for, in order, each pass stepping K / 8 times as a tile does; -1 after
// a pass whose lines were not all asked for within its steps.
std::vector<int64_t> prefetch_plan(int64_t rows, int64_t K, int64_t head, int64_t passes) {
  const std::vector<float> block(std::max<int64_t>(rows * K, 1));
  std::vector<int64_t> out;
  for (const Share& s : Share::all(rows, K, head, passes)) {
    Ahead a(block.data(), K, head, s);
    for (int64_t k = 0; k < (K & ~int64_t(7)); k += 8) a.step([&](const float* line) { out.push_back(line - block.data()); });
    if (a.left > 0) out.push_back(-1);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prefetch_plan", &prefetch_plan, "the lines a call's passes ask for ahead (for tests)");
  m.def("few_rows_linear", &few_rows_linear, "x w^T + b for few float32 rows (AVX2, FMA)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
