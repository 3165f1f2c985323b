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
//   lora_add: h [n, T, N] + (act(x @ wd[s] + bd[s]) * scale[s]) @ wu[s] + bu[s] for each row's slot s
//     (-1: the row is h), fused: a site's rows need neither sorting by slot nor a scatter back, and the
//     step between the two products costs no tensor ops (vLLM's add_lora does the same on GPUs).
//
// Accumulation is in float for float, bfloat16 and half, in double for double, each step an explicit
// fused multiply-add (std::fma), so no compiler choice between fused and separate rounding can make
// one code path (grouped or not, fused or two calls, a full block or the last) differ from another.
// Rows are split across torch's intra-op threads. The GIL is released.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;  // output columns kept in registers while an expand row streams w

// Rows per parallel task: enough multiply-adds (~64K) that a task outweighs its scheduling.
int64_t grain(int64_t per_row) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, per_row)); }

// The per-token products, shared by the two-call path (shrink, expand) and the fused one
// (lora_add), so both round alike: out[R] = x[K] @ w[K, R] and out[N] = a[R] @ w[R, N], sums in acc_t.

// G tokens' shrinks at once (each through its own slot) at a rank RR known at compile time: the
// sums stay in registers, and the G independent chains overlap instead of each multiply-add
// waiting on the one before it. Each output's sum runs in the same order for any G, so the bits
// are the same however tokens are grouped.
template <typename T, int RR, int G>
void shrink_group(const T* const* xr, const T* const* wi, T* const* o, int64_t K) {
  using acc_t = at::opmath_type<T>;
  acc_t a[G][RR] = {};
  for (int64_t k = 0; k < K; ++k) {
    for (int g = 0; g < G; ++g) {
      const acc_t xv = static_cast<acc_t>(xr[g][k]);
      const T* wr = wi[g] + k * RR;
#pragma omp simd
      for (int j = 0; j < RR; ++j) a[g][j] = std::fma(xv, static_cast<acc_t>(wr[j]), a[g][j]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < RR; ++j) o[g][j] = static_cast<T>(a[g][j]);
}

// ``count`` tokens in groups of G, the rest one at a time.
template <typename T, int RR, int G>
void shrink_groups(const T* const* xr, const T* const* wi, T* const* o, int64_t count, int64_t K) {
  int64_t i = 0;
  for (; i + G <= count; i += G) shrink_group<T, RR, G>(xr + i, wi + i, o + i, K);
  for (; i < count; ++i) shrink_group<T, RR, 1>(xr + i, wi + i, o + i, K);
}

// Tokens grouped for shrink_group at the usual ranks (as many as the registers hold); false for a
// rank without a fixed-size version (the caller takes shrink_generic per token).
template <typename T>
bool shrink_grouped(const T* const* xr, const T* const* wi, T* const* o, int64_t count, int64_t K, int64_t R) {
  switch (R) {
    case 4: shrink_groups<T, 4, 4>(xr, wi, o, count, K); return true;
    case 8: shrink_groups<T, 8, 4>(xr, wi, o, count, K); return true;
    case 16: shrink_groups<T, 16, 4>(xr, wi, o, count, K); return true;
    case 32: shrink_groups<T, 32, 2>(xr, wi, o, count, K); return true;
    case 64: shrink_groups<T, 64, 1>(xr, wi, o, count, K); return true;
    default: return false;
  }
}

// One token's shrink at any rank, the sums in ``a`` (R values).
template <typename T>
void shrink_generic(const T* xr, const T* wi, T* o, at::opmath_type<T>* a, int64_t K, int64_t R) {
  using acc_t = at::opmath_type<T>;
  std::fill(a, a + R, acc_t(0));
  for (int64_t k = 0; k < K; ++k) {
    const acc_t xv = static_cast<acc_t>(xr[k]);
    const T* wr = wi + k * R;
#pragma omp simd
    for (int64_t j = 0; j < R; ++j) a[j] = std::fma(xv, static_cast<acc_t>(wr[j]), a[j]);
  }
  for (int64_t j = 0; j < R; ++j) o[j] = static_cast<T>(a[j]);
}

// Output columns ob..ob+width of one expand, the sums in registers; W is kBlock for a whole block
// (a trip count the compiler knows) and 0 for the last, partial one (``width`` columns).
template <typename T, int64_t W>
void expand_block(const at::opmath_type<T>* av, const T* wi, T* o, int64_t R, int64_t N, int64_t ob, int64_t width) {
  using acc_t = at::opmath_type<T>;
  const int64_t cols = W > 0 ? W : width;
  acc_t acc[kBlock] = {};
  for (int64_t j = 0; j < R; ++j) {
    const acc_t s = av[j];
    const T* wr = wi + j * N + ob;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) acc[c] = std::fma(s, static_cast<acc_t>(wr[c]), acc[c]);
  }
  for (int64_t c = 0; c < cols; ++c) o[ob + c] = static_cast<T>(acc[c]);
}

template <typename T>
void expand_one(const T* ar, const T* wi, T* o, at::opmath_type<T>* av, int64_t R, int64_t N) {
  for (int64_t j = 0; j < R; ++j) av[j] = static_cast<at::opmath_type<T>>(ar[j]);
  int64_t ob = 0;
  for (; ob + kBlock <= N; ob += kBlock) expand_block<T, kBlock>(av, wi, o, R, N, ob, kBlock);
  if (ob < N) expand_block<T, 0>(av, wi, o, R, N, ob, N - ob);
}

// Pointers to rows begin..end's tokens (their inputs, their slots' weights, their outputs), for
// shrink_grouped; tokens of rows whose slot is negative are left out. Returns how many.
template <typename T>
int64_t token_pointers(const T* x, const T* w, const int64_t* slot, T* out, int64_t begin, int64_t end, int64_t tokens,
                       int64_t K, int64_t R, std::vector<const T*>& xs, std::vector<const T*>& ws, std::vector<T*>& os) {
  xs.clear(), ws.clear(), os.clear();
  for (int64_t i = begin; i < end; ++i) {
    if (slot[i] < 0) continue;
    for (int64_t t = 0; t < tokens; ++t) {
      xs.push_back(x + (i * tokens + t) * K);
      ws.push_back(w + slot[i] * K * R);
      os.push_back(out + (i * tokens + t) * R);
    }
  }
  return static_cast<int64_t>(xs.size());
}

template <typename T>
void shrink_rows(const T* x, const T* w, const int64_t* slot, T* out, int64_t begin, int64_t end, int64_t tokens,
                 int64_t K, int64_t R) {
  std::vector<const T*> xs, ws;
  std::vector<T*> os;
  const int64_t count = token_pointers<T>(x, w, slot, out, begin, end, tokens, K, R, xs, ws, os);
  if (shrink_grouped<T>(xs.data(), ws.data(), os.data(), count, K, R)) return;
  std::vector<at::opmath_type<T>> acc(R);
  for (int64_t i = 0; i < count; ++i) shrink_generic<T>(xs[i], ws[i], os[i], acc.data(), K, R);
}

template <typename T>
void expand_rows(const T* a, const T* w, const int64_t* slot, T* out, int64_t begin, int64_t end, int64_t tokens,
                 int64_t R, int64_t N) {
  std::vector<at::opmath_type<T>> av(R);
  for (int64_t i = begin; i < end; ++i)
    for (int64_t t = 0; t < tokens; ++t)
      expand_one<T>(a + (i * tokens + t) * R, w + slot[i] * R * N, out + (i * tokens + t) * N, av.data(), R, N);
}

// What lora_add adds to a row: the bank's tensors for one dtype (bd, bu may be null).
template <typename T>
struct Bank {
  const T *wd, *wu, *scale, *bd, *bu;
  bool relu;
  int64_t K, R, N;
};

// h + delta for rows begin..end: delta = (act(x @ wd[s] + bd[s]) * scale[s]) @ wu[s] + bu[s], each step
// rounded to T as the unfused path rounds it (its add, activation, scale, expand and add are separate
// tensor ops); a row whose slot is -1 is h as is.
template <typename T>
void lora_rows(const T* h, const T* x, const Bank<T>& b, const int64_t* slot, T* out, int64_t begin, int64_t end,
               int64_t tokens) {
  using acc_t = at::opmath_type<T>;
  std::vector<acc_t> acc(std::max(b.R, int64_t(1)));
  std::vector<T> shrunk((end - begin) * tokens * b.R), d(b.N);
  // every token's shrink first (grouped), into shrunk[(i - begin) * tokens + t]
  shrink_rows<T>(x + begin * tokens * b.K, b.wd, slot + begin, shrunk.data(), 0, end - begin, tokens, b.K, b.R);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t s = slot[i];
    for (int64_t t = 0; t < tokens; ++t) {
      const T* hr = h + (i * tokens + t) * b.N;
      T* o = out + (i * tokens + t) * b.N;
      if (s < 0) {
        std::copy(hr, hr + b.N, o);
        continue;
      }
      T* a = shrunk.data() + ((i - begin) * tokens + t) * b.R;
      const acc_t sc = static_cast<acc_t>(b.scale[s]);
      for (int64_t j = 0; j < b.R; ++j) {
        T v = a[j];
        if (b.bd) v = static_cast<T>(static_cast<acc_t>(v) + static_cast<acc_t>(b.bd[s * b.R + j]));
        if (b.relu && static_cast<acc_t>(v) < acc_t(0)) v = static_cast<T>(0);
        a[j] = static_cast<T>(static_cast<acc_t>(v) * sc);
      }
      expand_one<T>(a, b.wu + s * b.R * b.N, d.data(), acc.data(), b.R, b.N);
      for (int64_t c = 0; c < b.N; ++c) {
        T v = d[c];
        if (b.bu) v = static_cast<T>(static_cast<acc_t>(v) + static_cast<acc_t>(b.bu[s * b.N + c]));
        o[c] = static_cast<T>(static_cast<acc_t>(hr[c]) + static_cast<acc_t>(v));
      }
    }
  }
}

// The checks both products share; returns the slots, contiguous, each verified to be in the bank
// (an index outside it would read foreign memory).
torch::Tensor checked_slots(const torch::Tensor& in, const torch::Tensor& w, const torch::Tensor& slot, const char* what,
                            int64_t lowest = 0) {
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
    TORCH_CHECK(p[i] >= lowest && p[i] < w.size(0), what, ": slot ", p[i], " outside a bank of ", w.size(0));
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

// A per-slot vector of the bank ([S] or [S, len]) or none; checked against the bank.
const void* slot_vector(const c10::optional<torch::Tensor>& t, const torch::Tensor& w, int64_t len, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->is_cpu() && t->scalar_type() == w.scalar_type() && t->is_contiguous(), "lora_add: ", name,
              " must be a contiguous CPU tensor of the weights' dtype");
  TORCH_CHECK(t->numel() == w.size(0) * len, "lora_add: ", name, " has ", t->numel(), " values for ", w.size(0),
              " slots of ", len);
  return t->data_ptr();
}

// h [n, T, N] + each row's adapter delta (x [n, T, K]; slot -1: no adapter), in one pass.
torch::Tensor lora_add(const torch::Tensor& h, const torch::Tensor& x, const torch::Tensor& wd, const torch::Tensor& wu,
                       const torch::Tensor& slot, const torch::Tensor& scale, const c10::optional<torch::Tensor>& bd,
                       const c10::optional<torch::Tensor>& bu, bool relu) {
  auto s = checked_slots(x, wd, slot, "lora_add", -1);
  TORCH_CHECK(wu.dim() == 3 && wu.size(0) == wd.size(0) && wu.size(1) == wd.size(2) && wu.is_contiguous() &&
                  wu.scalar_type() == wd.scalar_type() && wu.is_cpu(),
              "lora_add: wu must be a contiguous CPU [S, R, N] of the same slots, rank and dtype as wd");
  TORCH_CHECK(h.dim() == 3 && h.size(0) == x.size(0) && h.size(1) == x.size(1) && h.size(2) == wu.size(2) &&
                  h.scalar_type() == wd.scalar_type() && h.is_cpu(),
              "lora_add: h must be [n, T, N] of the input's rows and tokens, the weights' width and dtype");
  const int64_t n = x.size(0), tokens = x.size(1), K = x.size(2), R = wd.size(2), N = wu.size(2);
  auto hc = h.contiguous();
  auto xc = x.contiguous();
  auto out = torch::empty_like(hc);
  const void* sc = slot_vector(scale, wd, 1, "scale");
  TORCH_CHECK(sc != nullptr, "lora_add: scale is required");
  const void* bdp = slot_vector(bd, wd, R, "bd");
  const void* bup = slot_vector(bu, wd, N, "bu");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_add", [&] {
    const Bank<scalar_t> b{wd.data_ptr<scalar_t>(), wu.data_ptr<scalar_t>(), static_cast<const scalar_t*>(sc),
                           static_cast<const scalar_t*>(bdp), static_cast<const scalar_t*>(bup), relu, K, R, N};
    const scalar_t* hp = hc.data_ptr<scalar_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* sp = s.data_ptr<int64_t>();
    at::parallel_for(0, n, grain(tokens * (K * R + R * N)), [&](int64_t b0, int64_t e0) {
      lora_rows<scalar_t>(hp, xp, b, sp, op, b0, e0, tokens);
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("shrink", &shrink, "each row's input times its slot's [K, R] matrix",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("expand", &expand, "each row's [R] vector times its slot's [R, N] matrix",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("lora_add", &lora_add,
        "h plus each row's bottleneck delta through its slot (-1: none), shrink, bias, activation, scale, "
        "expand and bias in one pass",
        pybind11::arg("h"), pybind11::arg("x"), pybind11::arg("wd"), pybind11::arg("wu"), pybind11::arg("slot"),
        pybind11::arg("scale"), pybind11::arg("bd") = pybind11::none(), pybind11::arg("bu") = pybind11::none(),
        pybind11::arg("relu") = false, pybind11::call_guard<pybind11::gil_scoped_release>());
}
