// Decode attention over the paged KV cache, one pass over each request's keys and values.
//
// Why a hand-written kernel (serve/decode_kernel.py builds it, serve/paged_attention.py uses it):
// a decode step reads every running request's whole K and V from pages scattered through the
// cache, so on a CPU the step's attention is bound by how memory is walked. The torch.compile
// version of the same arithmetic reads the values once per 16-float slice of the head dimension,
// key by key (the reduction loop innermost); this kernel streams each key and value row once,
// front to back, and stops at each request's own length instead of the batch's longest (vLLM's
// CPU backend also reads its pages with its own kernels). Measured on the random Llama of
// benchmarks/vs_vllm.py (32 requests, ~100 keys, 8 heads of 64): about 2x the compiled version
// per call on its own, 1.08x per whole decode step (in a step it waits on DRAM for the cache).
// Float32 with head sizes divisible by 8 takes decode_f32 (AVX2 + FMA builds): a further 2.3x
// per call on its own, 1.09x per decode step (benchmarks/decode_attention.py, RESULTS.md).
//
//   q       [B, H, D]    one query per request (any strides)
//   k_cache [Nk, Hkv, D] contiguous; row n holds one token's keys for every KV head
//   v_cache [Nv, Hkv, D] contiguous (Nk and Nv may differ: only rows below both are read)
//   where   [B, L] int64 the cache row of each request's key l
//   valid   [B, L] bool  which of those are real (padding is skipped)
// returns   [B, H, D]    softmax(q k^T * scale) v per request; query head h reads KV head h / (H / Hkv)
//
// Accumulation is in float for every input dtype (float, bfloat16, half). The GIL is released.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
void decode(const T* q, const T* k, const T* v, const int64_t* where, const bool* valid, T* out,
            int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t L, int64_t q_b, int64_t q_h,
            int64_t q_d, float scale) {
  const int64_t group = H / Hkv, row = Hkv * D;
  std::vector<float> qf(H * D), scores(H * L), acc(H * D);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) qf[h * D + d] = static_cast<float>(q[b * q_b + h * q_h + d * q_d]) * scale;
    const int64_t* wb = where + b * L;
    const bool* vb = valid + b * L;
    // scores: each key row once, every query head against its KV head
    for (int64_t l = 0; l < L; ++l) {
      if (!vb[l]) continue;
      const T* kr = k + wb[l] * row;
      for (int64_t h = 0; h < H; ++h) {
        const T* kh = kr + (h / group) * D;
        const float* qh = qf.data() + h * D;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += qh[d] * static_cast<float>(kh[d]);
        scores[h * L + l] = s;
      }
    }
    // softmax over the valid keys of each head
    for (int64_t h = 0; h < H; ++h) {
      float* sh = scores.data() + h * L;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t l = 0; l < L; ++l)
        if (vb[l]) m = std::max(m, sh[l]);
      float z = 0.f;
      for (int64_t l = 0; l < L; ++l)
        if (vb[l]) {
          sh[l] = std::exp(sh[l] - m);
          z += sh[l];
        }
      const float inv = 1.f / z;
      for (int64_t l = 0; l < L; ++l) sh[l] *= inv;
    }
    // weighted values: each value row once
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t l = 0; l < L; ++l) {
      if (!vb[l]) continue;
      const T* vr = v + wb[l] * row;
      for (int64_t h = 0; h < H; ++h) {
        const float w = scores[h * L + l];
        const T* vh = vr + (h / group) * D;
        float* ah = acc.data() + h * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ah[d] += w * static_cast<float>(vh[d]);
      }
    }
    T* ob = out + b * H * D;
    for (int64_t i = 0; i < H * D; ++i) ob[i] = static_cast<T>(acc[i]);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// The float32 path, vectorised (AVX2 + FMA), for head sizes that are a multiple of 8. Three
// changes from decode<T> above, each measured on the random Llama's step (32 requests, ~100 keys,
// 8 heads of 64): the valid keys are listed once, so no loop tests the mask; eight keys' scores
// are summed at once (eight 8-lane dot products folded by one transpose-and-add instead of eight
// horizontal sums); and exp runs eight at a time (exp8 below) instead of one libm call per score.

// e^x for x <= 0, eight at a time: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor
// polynomial (relative error < 2e-7 on that interval, about 2 ulp), 2^n built in the exponent
// bits. Below -87.3 (where e^x leaves float's normal range) the result is 0.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln 2 in two parts (Cody-Waite)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// the eight sums of a[0..7], each 8 lanes, as one vector (lane j = sum of a[j])
inline __m256 sum8(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  // lanes: s0123 = [a0 a1 a2 a3 | a0 a1 a2 a3] halves, s4567 likewise: add the 128-bit halves
  const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}

inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
}

void decode_f32(const float* q, const float* k, const float* v, const int64_t* where, const bool* valid, float* out,
                int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t L, int64_t q_b, int64_t q_h, int64_t q_d,
                float scale) {
  const int64_t group = H / Hkv, row = Hkv * D;
  std::vector<float> qf(H * D), scores(H * (L + 8)), acc(H * D);
  std::vector<const float*> keys(L), vals(L);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) qf[h * D + d] = q[b * q_b + h * q_h + d * q_d] * scale;
    int64_t n = 0;  // the valid keys, in order
    for (int64_t l = 0; l < L; ++l)
      if (valid[b * L + l]) keys[n] = k + where[b * L + l] * row, vals[n++] = v + where[b * L + l] * row;
    float* out_b = out + b * H * D;
    if (n == 0) {  // nothing to attend to: decode<T> gives NaN (0/0); so does this
      std::fill(out_b, out_b + H * D, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    const int64_t stride = n + 8;  // each head's scores, padded for the last block of 8
    // scores: eight keys at a time, every query head against its KV head
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int64_t h = 0; h < H; ++h) {
        const float* qh = qf.data() + h * D;
        const int64_t off = (h / group) * D;
        __m256 a[8];
        for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 qv = _mm256_loadu_ps(qh + d);
          for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys[i + j] + off + d), a[j]);
        }
        _mm256_storeu_ps(scores.data() + h * stride + i, sum8(a));
      }
    for (; i < n; ++i)
      for (int64_t h = 0; h < H; ++h) scores[h * stride + i] = dot(qf.data() + h * D, keys[i] + (h / group) * D, D);
    // softmax of each head's n scores
    for (int64_t h = 0; h < H; ++h) {
      float* sh = scores.data() + h * stride;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) m = std::max(m, sh[j]);
      const __m256 mv = _mm256_set1_ps(m);
      __m256 zv = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sh + j), mv));
        _mm256_storeu_ps(sh + j, e);
        zv = _mm256_add_ps(zv, e);
      }
      if (j < n) {  // the last 1-7 scores through the same exp8, the padding masked off
        alignas(32) float tail[8];
        for (int t = 0; t < 8; ++t) tail[t] = j + t < n ? sh[j + t] - m : -std::numeric_limits<float>::infinity();
        const __m256 e = exp8(_mm256_load_ps(tail));
        _mm256_store_ps(tail, e);
        for (int64_t t = 0; j + t < n; ++t) sh[j + t] = tail[t];
        zv = _mm256_add_ps(zv, e);
      }
      alignas(32) float z8[8];
      _mm256_store_ps(z8, zv);
      float z = 0.f;
      for (int t = 0; t < 8; ++t) z += z8[t];
      const float inv = 1.f / z;
      for (int64_t t = 0; t < n; ++t) sh[t] *= inv;
    }
    // weighted values: each value row once
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t h = 0; h < H; ++h) {
        const __m256 w = _mm256_set1_ps(scores[h * stride + j]);
        const float* vh = vals[j] + (h / group) * D;
        float* ah = acc.data() + h * D;
        for (int64_t d = 0; d < D; d += 8)
          _mm256_storeu_ps(ah + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(vh + d), _mm256_loadu_ps(ah + d)));
      }
    std::copy(acc.begin(), acc.end(), out_b);
  }
}
#endif

torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                     const torch::Tensor& where, const torch::Tensor& valid, double scale, bool vectorised) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q, k_cache, v_cache must be 3-D");
  TORCH_CHECK(where.dim() == 2 && valid.dim() == 2 && where.sizes() == valid.sizes(), "where/valid must be [B, L]");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "k_cache and v_cache must be contiguous");
  TORCH_CHECK(k_cache.size(1) == v_cache.size(1) && k_cache.size(2) == v_cache.size(2),
              "k_cache and v_cache must have the same heads and head size");
  TORCH_CHECK(where.scalar_type() == torch::kLong && valid.scalar_type() == torch::kBool, "where int64, valid bool");
  // the two caches may be views of different lengths (transformers' token views): index below both
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  const int64_t N = std::min(k_cache.size(0), v_cache.size(0));
  TORCH_CHECK(where.size(0) == B, "where has ", where.size(0), " rows for ", B, " queries");
  TORCH_CHECK(k_cache.size(2) == D && Hkv > 0 && H % Hkv == 0, "head sizes do not match");
  auto w = where.contiguous();
  auto ok = valid.contiguous();
  if (w.numel() > 0) {  // an index outside the cache would read foreign memory: refuse it
    TORCH_CHECK(w.min().item<int64_t>() >= 0 && w.max().item<int64_t>() < N, "where indexes rows outside the cache");
  }
  auto out = torch::empty({B, H, D}, q.options());
#if defined(__AVX2__) && defined(__FMA__)
  if (vectorised && q.scalar_type() == torch::kFloat && D % 8 == 0) {
    decode_f32(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), w.data_ptr<int64_t>(),
               ok.data_ptr<bool>(), out.data_ptr<float>(), B, H, Hkv, D, w.size(1), q.stride(0), q.stride(1),
               q.stride(2), static_cast<float>(scale));
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                     w.data_ptr<int64_t>(), ok.data_ptr<bool>(), out.data_ptr<scalar_t>(), B, H, Hkv, D,
                     w.size(1), q.stride(0), q.stride(1), q.stride(2), static_cast<float>(scale));
  });
  return out;
}

}  // namespace

torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& where, const torch::Tensor& valid, double scale) {
  return attend(q, k_cache, v_cache, where, valid, scale, true);
}

// the same without decode_f32: the generic loop for every dtype (tests and benchmarks compare the two)
torch::Tensor paged_decode_generic(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                   const torch::Tensor& where, const torch::Tensor& valid, double scale) {
  return attend(q, k_cache, v_cache, where, valid, scale, false);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over the paged KV cache",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("paged_decode_generic", &paged_decode_generic, "paged_decode without the vectorised float32 path",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
