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

torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& where, const torch::Tensor& valid, double scale) {
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                     w.data_ptr<int64_t>(), ok.data_ptr<bool>(), out.data_ptr<scalar_t>(), B, H, Hkv, D,
                     w.size(1), q.stride(0), q.stride(1), q.stride(2), static_cast<float>(scale));
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over the paged KV cache",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
