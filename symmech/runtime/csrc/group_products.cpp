// symmech's CPU kernel for the tracker's per-group inner products (symmech/runtime/native.py).
//
// For each tensor, viewed as rows R × columns C (R = its first dimension), and each asked pair
// (i, j) of its sources (θ, g, the momentum buffer: equal shapes, contiguous), one sweep that
// reads every source once computes
//   rows[p, r] = Σ_c x_i[r, c] · x_j[r, c]        (the groups along the first dimension)
//   cols[p, c] = Σ_r x_i[r, c] · x_j[r, c]        (reduced further in Python to any other one)
// accumulated in double. Rows are split across threads; each thread keeps its own column sums,
// added up at the end. The inner loop is compiled for AVX-512, AVX2 and plain x86-64, chosen at
// load time (target_clones), so a cached build runs on any x86-64 machine.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SYMMECH_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SYMMECH_CLONES
#endif

template <typename T>
SYMMECH_CLONES double row_dot(const T* x, const T* y, int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < n; ++c) acc += static_cast<double>(x[c]) * static_cast<double>(y[c]);
  return acc;
}

// Four rows at once: their sums, and one read-modify-write of the column sums per four rows.
template <typename T>
SYMMECH_CLONES void rows4_into(const T* x, const T* y, int64_t n, double* rows, double* cols) {
  const T *x0 = x, *x1 = x + n, *x2 = x + 2 * n, *x3 = x + 3 * n;
  const T *y0 = y, *y1 = y + n, *y2 = y + 2 * n, *y3 = y + 3 * n;
  double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t c = 0; c < n; ++c) {
    const double p0 = static_cast<double>(x0[c]) * static_cast<double>(y0[c]);
    const double p1 = static_cast<double>(x1[c]) * static_cast<double>(y1[c]);
    const double p2 = static_cast<double>(x2[c]) * static_cast<double>(y2[c]);
    const double p3 = static_cast<double>(x3[c]) * static_cast<double>(y3[c]);
    a0 += p0;
    a1 += p1;
    a2 += p2;
    a3 += p3;
    cols[c] += (p0 + p1) + (p2 + p3);
  }
  rows[0] = a0;
  rows[1] = a1;
  rows[2] = a2;
  rows[3] = a3;
}

template <typename T>
SYMMECH_CLONES double row_into(const T* x, const T* y, int64_t n, double* cols) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < n; ++c) {
    const double v = static_cast<double>(x[c]) * static_cast<double>(y[c]);
    acc += v;
    cols[c] += v;
  }
  return acc;
}

template <typename T>
void sweep(const std::vector<torch::Tensor>& sources, const std::vector<int64_t>& pairs,
           bool want_cols, torch::Tensor& rows, torch::Tensor& cols) {
  const int64_t P = static_cast<int64_t>(pairs.size() / 2);
  const int64_t R = sources[0].size(0);
  const int64_t C = R == 0 ? 0 : sources[0].numel() / R;
  std::vector<const T*> src;
  for (const auto& s : sources) src.push_back(s.data_ptr<T>());
  double* out_rows = rows.data_ptr<double>();
  const int threads = want_cols ? at::get_num_threads() : 1;
  std::vector<double> partial(want_cols ? static_cast<size_t>(threads) * P * C : 0, 0.0);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(C * P, 1));
  const int64_t blocks = (R + 3) / 4;  // threads take blocks of four rows
  at::parallel_for(0, blocks, std::max<int64_t>(1, grain / 4), [&](int64_t begin, int64_t end) {
    double* mine = want_cols ? partial.data() + static_cast<size_t>(at::get_thread_num()) * P * C
                             : nullptr;
    double sums[4];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = 4 * block, rn = std::min<int64_t>(4, R - r0);
      for (int64_t p = 0; p < P; ++p) {
        const T* x = src[pairs[2 * p]] + r0 * C;
        const T* y = src[pairs[2 * p + 1]] + r0 * C;
        double* row_out = out_rows + p * R + r0;
        if (mine != nullptr && rn == 4) {
          rows4_into<T>(x, y, C, sums, mine + p * C);
          for (int k = 0; k < 4; ++k) row_out[k] = sums[k];
        } else {
          for (int64_t k = 0; k < rn; ++k) {
            row_out[k] = mine != nullptr ? row_into<T>(x + k * C, y + k * C, C, mine + p * C)
                                         : row_dot<T>(x + k * C, y + k * C, C);
          }
        }
      }
    }
  });
  if (want_cols) {
    double* out_cols = cols.data_ptr<double>();
    std::fill(out_cols, out_cols + P * C, 0.0);
    for (int t = 0; t < threads; ++t) {
      const double* part = partial.data() + static_cast<size_t>(t) * P * C;
      for (int64_t k = 0; k < P * C; ++k) out_cols[k] += part[k];
    }
  }
}

// cols (P, C) of a tensor of ``shape``: the sums over every dimension but ``dim`` (≥ 1), (P, G).
torch::Tensor column_groups(const torch::Tensor& cols, at::IntArrayRef shape, int64_t dim) {
  const int64_t P = cols.size(0), C = cols.size(1), G = shape[dim];
  int64_t inner = 1;
  for (int64_t d = dim + 1; d < static_cast<int64_t>(shape.size()); ++d) inner *= shape[d];
  const int64_t outer = G * inner == 0 ? 0 : C / (G * inner);
  torch::Tensor out = torch::zeros({P, G}, cols.options());
  const double* in = cols.data_ptr<double>();
  double* o = out.data_ptr<double>();
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t a = 0; a < outer; ++a) {
      for (int64_t g = 0; g < G; ++g) {
        const double* x = in + p * C + (a * G + g) * inner;
        double acc = 0.0;
        for (int64_t i = 0; i < inner; ++i) acc += x[i];
        o[p * G + g] += acc;
      }
    }
  }
  return out;
}

// One call for every tensor of a hook call: sources[t] are tensor t's inputs, pairs[t] its
// flattened (i, j) pairs, dims[t] the group dimensions asked for. Returns per tensor one
// (P, G) tensor per asked dimension, in the sources' dtype (accumulated in double).
std::vector<std::vector<torch::Tensor>> group_products(
    const std::vector<std::vector<torch::Tensor>>& sources,
    const std::vector<std::vector<int64_t>>& pairs, const std::vector<std::vector<int64_t>>& dims) {
  TORCH_CHECK(sources.size() == pairs.size() && pairs.size() == dims.size(),
              "group_products: one list of sources, pairs and dimensions per tensor");
  std::vector<std::vector<torch::Tensor>> out;
  out.reserve(sources.size());
  for (size_t t = 0; t < sources.size(); ++t) {
    const auto& s = sources[t];
    TORCH_CHECK(!s.empty() && pairs[t].size() % 2 == 0, "group_products: tensor ", t,
                " has no sources or an odd pair list");
    for (const auto& x : s) {
      TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1 &&
                      x.sizes() == s[0].sizes() && x.scalar_type() == s[0].scalar_type(),
                  "group_products: tensor ", t,
                  "'s sources must be contiguous CPU tensors of one shape and dtype");
    }
    for (int64_t k : pairs[t]) {
      TORCH_CHECK(k >= 0 && k < static_cast<int64_t>(s.size()), "group_products: pair index ",
                  k, " out of range for tensor ", t);
    }
    bool want_cols = false;
    for (int64_t d : dims[t]) {
      TORCH_CHECK(d >= 0 && d < s[0].dim(), "group_products: dimension ", d,
                  " out of range for tensor ", t);
      want_cols = want_cols || d > 0;
    }
    const int64_t P = static_cast<int64_t>(pairs[t].size() / 2);
    const int64_t R = s[0].size(0);
    const int64_t C = R == 0 ? 0 : s[0].numel() / R;
    auto opts = s[0].options().dtype(torch::kFloat64);
    torch::Tensor rows = torch::empty({P, R}, opts);
    torch::Tensor cols = want_cols ? torch::empty({P, C}, opts) : torch::empty({0}, opts);
    if (s[0].scalar_type() == torch::kFloat32) {
      sweep<float>(s, pairs[t], want_cols, rows, cols);
    } else if (s[0].scalar_type() == torch::kFloat64) {
      sweep<double>(s, pairs[t], want_cols, rows, cols);
    } else {
      TORCH_CHECK(false, "group_products: float32 or float64 only, got ", s[0].scalar_type());
    }
    std::vector<torch::Tensor> per_dim;
    for (int64_t d : dims[t]) {
      torch::Tensor v = d == 0 ? rows : column_groups(cols, s[0].sizes(), d);
      per_dim.push_back(v.to(s[0].scalar_type()));
    }
    out.push_back(std::move(per_dim));
  }
  return out;
}

// Adam's coming step a = m' / (sqrt(v') / bc2_sqrt + eps), with m' = lerp(m, g, w1) and
// v' = beta2 v + (1 - beta2) g g (then max with the running maximum under amsgrad), in the
// tensors' precision and torch's order of operations, in one pass that reads g, m and v once
// and writes a (torch's own ops make m' and v' and pass over v' four more times).
// One block of elements; ``low`` and ``ams`` are fixed per call so that the loop has no branch
// and vectorises (sqrt and division included: built with -fno-math-errno).
template <typename T, bool low, bool ams>
SYMMECH_CLONES void adam_block(const T* g, const T* m, const T* v, const T* vmax, T* a,
                               int64_t n, T w, T wc, T b2, T c2, T bc, T eps) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i], mi = m[i];
    const T m1 = low ? mi + w * (gi - mi) : gi - (gi - mi) * wc;  // torch's lerp, both forms
    T v1 = v[i] * b2;
    v1 = v1 + c2 * gi * gi;
    if (ams) v1 = vmax[i] > v1 ? vmax[i] : v1;
    a[i] = m1 / (std::sqrt(v1) / bc + eps);
  }
}

template <typename T>
void adam_direction_into(const T* g, const T* m, const T* v, const T* vmax, T* a, int64_t n,
                         double w1, double beta2, double bc2_sqrt, double eps) {
  const T w = static_cast<T>(w1), wc = static_cast<T>(1.0 - w1), b2 = static_cast<T>(beta2);
  const T c2 = static_cast<T>(1.0 - beta2), bc = static_cast<T>(bc2_sqrt);
  const T e = static_cast<T>(eps);
  const bool low = w1 < 0.5;  // torch's lerp: the form that is exact at its nearer end
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    const int64_t k = end - begin;
    const T *gb = g + begin, *mb = m + begin, *vb = v + begin;
    const T* xb = vmax != nullptr ? vmax + begin : nullptr;
    T* ab = a + begin;
    if (low && xb == nullptr) adam_block<T, true, false>(gb, mb, vb, xb, ab, k, w, wc, b2, c2, bc, e);
    if (low && xb != nullptr) adam_block<T, true, true>(gb, mb, vb, xb, ab, k, w, wc, b2, c2, bc, e);
    if (!low && xb == nullptr) adam_block<T, false, false>(gb, mb, vb, xb, ab, k, w, wc, b2, c2, bc, e);
    if (!low && xb != nullptr) adam_block<T, false, true>(gb, mb, vb, xb, ab, k, w, wc, b2, c2, bc, e);
  });
}

torch::Tensor adam_direction(const torch::Tensor& g, const torch::Tensor& m,
                             const torch::Tensor& v, const torch::Tensor& vmax, double w1,
                             double beta2, double bc2_sqrt, double eps) {
  const bool amsgrad = vmax.numel() > 0;
  for (const auto* t : {&g, &m, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->sizes() == g.sizes() &&
                    t->scalar_type() == g.scalar_type(),
                "adam_direction: g, m and v must be contiguous CPU tensors of one shape and dtype");
  }
  TORCH_CHECK(!amsgrad || (vmax.is_contiguous() && vmax.sizes() == g.sizes() &&
                           vmax.scalar_type() == g.scalar_type()),
              "adam_direction: the running maximum must match g");
  torch::Tensor a = torch::empty_like(g);
  if (g.scalar_type() == torch::kFloat32) {
    adam_direction_into<float>(g.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(),
                               amsgrad ? vmax.data_ptr<float>() : nullptr, a.data_ptr<float>(),
                               g.numel(), w1, beta2, bc2_sqrt, eps);
  } else if (g.scalar_type() == torch::kFloat64) {
    adam_direction_into<double>(g.data_ptr<double>(), m.data_ptr<double>(), v.data_ptr<double>(),
                                amsgrad ? vmax.data_ptr<double>() : nullptr,
                                a.data_ptr<double>(), g.numel(), w1, beta2, bc2_sqrt, eps);
  } else {
    TORCH_CHECK(false, "adam_direction: float32 or float64 only, got ", g.scalar_type());
  }
  return a;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_products", &group_products,
        "Per-row and per-column sums of products of equal-shaped tensors, one sweep each");
  m.def("adam_direction", &adam_direction,
        "Adam's coming step from g, m and v in one pass (torch's order of operations)");
}
