// Each row's own low-rank adapter product, read in place from a bank (kernels.py's "kernel" strategy).
//
// Why a hand-written kernel (native.py builds it, kernels.py measures it against the others): in a
// decode step every row is one token with its own adapter, so the work per site is a matrix-vector
// product per row through that adapter's [K, R] and [R, N] matrices. The "gather" strategy copies
// each row's matrices out of the bank (index_select) and then runs bmm over the copies: the
// weights cross memory three times. Here each row's matrices are read once, where the bank holds
// them (Punica's BGMV "shrink" and "expand", which vLLM's LoRA layers also split in two, with the
// adapter's activation, bias and scale applied between them by the caller). Each row's sums run in
// the same order whatever else is in the batch, so a row's result does not depend on its batch.
//
//   shrink: x [n, T, K], w [S, K, R], slot [n] int64 -> [n, T, R]   out[i, t] = x[i, t] @ w[slot[i]]
//   expand: a [n, T, R], w [S, R, N], slot [n] int64 -> [n, T, N]   out[i, t] = a[i, t] @ w[slot[i]]
//
// Accumulation is in float for float, bfloat16 and half, in double for double. Rows are split across torch's
// intra-op threads. The GIL is released.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;  // output columns kept in registers while an expand row streams w

// Rows per parallel task: enough multiply-adds (~64K) that a task outweighs its scheduling.
int64_t grain(int64_t per_row) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, per_row)); }

template <typename T>
void shrink_rows(const T* x, const T* w, const int64_t* slot, T* out, int64_t begin, int64_t end, int64_t tokens,
                 int64_t K, int64_t R) {
  using acc_t = at::opmath_type<T>;
  std::vector<acc_t> acc(R);
  for (int64_t i = begin; i < end; ++i) {
    const T* wi = w + slot[i] * K * R;
    for (int64_t t = 0; t < tokens; ++t) {
      const T* xr = x + (i * tokens + t) * K;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t* a = acc.data();
      for (int64_t k = 0; k < K; ++k) {
        const acc_t xv = static_cast<acc_t>(xr[k]);
        const T* wr = wi + k * R;
#pragma omp simd
        for (int64_t j = 0; j < R; ++j) a[j] += xv * static_cast<acc_t>(wr[j]);
      }
      T* o = out + (i * tokens + t) * R;
      for (int64_t j = 0; j < R; ++j) o[j] = static_cast<T>(a[j]);
    }
  }
}

template <typename T>
void expand_rows(const T* a, const T* w, const int64_t* slot, T* out, int64_t begin, int64_t end, int64_t tokens,
                 int64_t R, int64_t N) {
  using acc_t = at::opmath_type<T>;
  std::vector<acc_t> av(R);
  for (int64_t i = begin; i < end; ++i) {
    const T* wi = w + slot[i] * R * N;
    for (int64_t t = 0; t < tokens; ++t) {
      const T* ar = a + (i * tokens + t) * R;
      for (int64_t j = 0; j < R; ++j) av[j] = static_cast<acc_t>(ar[j]);
      T* o = out + (i * tokens + t) * N;
      for (int64_t ob = 0; ob < N; ob += kBlock) {
        const int64_t width = std::min(kBlock, N - ob);
        acc_t acc[kBlock] = {};
        for (int64_t j = 0; j < R; ++j) {
          const acc_t s = av[j];
          const T* wr = wi + j * N + ob;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) acc[c] += s * static_cast<acc_t>(wr[c]);
        }
        for (int64_t c = 0; c < width; ++c) o[ob + c] = static_cast<T>(acc[c]);
      }
    }
  }
}

// The checks both products share; returns the slots, contiguous, each verified to be in the bank
// (an index outside it would read foreign memory).
torch::Tensor checked_slots(const torch::Tensor& in, const torch::Tensor& w, const torch::Tensor& slot, const char* what) {
  TORCH_CHECK(in.dim() == 3 && w.dim() == 3 && slot.dim() == 1, what, ": expects in [n, T, d], w [S, d, e], slot [n]");
  TORCH_CHECK(in.device().is_cpu() && w.device().is_cpu() && slot.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(in.scalar_type() == w.scalar_type(), what, ": input and weights must share a dtype");
  TORCH_CHECK(w.is_contiguous(), what, ": the bank's weights must be contiguous");
  TORCH_CHECK(slot.scalar_type() == torch::kLong, what, ": slots must be int64");
  TORCH_CHECK(slot.size(0) == in.size(0), what, ": ", slot.size(0), " slots for ", in.size(0), " rows");
  TORCH_CHECK(in.size(2) == w.size(1), what, ": input width ", in.size(2), " != weight rows ", w.size(1));
  auto s = slot.contiguous();
  const int64_t* p = s.data_ptr<int64_t>();
  for (int64_t i = 0; i < s.size(0); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < w.size(0), what, ": slot ", p[i], " outside a bank of ", w.size(0));
  return s;
}

// One product for every row: shrink (x [n, T, K] by [K, R] slots) or expand (a [n, T, R] by [R, N]).
torch::Tensor per_row(const torch::Tensor& in, const torch::Tensor& w, const torch::Tensor& slot, bool expand) {
  const char* what = expand ? "expand" : "shrink";
  auto s = checked_slots(in, w, slot, what);
  auto ic = in.contiguous();
  const int64_t n = in.size(0), tokens = in.size(1), K = in.size(2), M = w.size(2);
  auto out = torch::empty({n, tokens, M}, in.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "per_row", [&] {
    const scalar_t* ip = ic.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* sp = s.data_ptr<int64_t>();
    at::parallel_for(0, n, grain(tokens * K * M), [&](int64_t b, int64_t e) {
      if (expand)
        expand_rows<scalar_t>(ip, wp, sp, op, b, e, tokens, K, M);
      else
        shrink_rows<scalar_t>(ip, wp, sp, op, b, e, tokens, K, M);
    });
  });
  return out;
}

torch::Tensor shrink(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& slot) {
  return per_row(x, w, slot, false);
}

torch::Tensor expand(const torch::Tensor& a, const torch::Tensor& w, const torch::Tensor& slot) {
  return per_row(a, w, slot, true);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("shrink", &shrink, "each row's input times its slot's [K, R] matrix",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("expand", &expand, "each row's [R] vector times its slot's [R, N] matrix",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
