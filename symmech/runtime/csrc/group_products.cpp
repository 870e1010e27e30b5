// symmech's CPU kernel for the tracker's per-group inner products (symmech/runtime/native.py).
//
// products(): for each tensor, viewed as rows R × columns C (R = its first dimension), and each
// asked pair (i, j) of its sources (θ, g, the momentum buffer, Adam's step: equal shapes,
// contiguous; j = -1 for source i alone), one sweep that reads every source once computes
//   rows[p, r] = Σ_c x_i[r, c] · x_j[r, c]        (the groups along the first dimension)
//   cols[p, c] = Σ_r x_i[r, c] · x_j[r, c]        (summed further to any other dimension's groups)
// accumulated in double and written into one float64 vector; scatter() then forms the bank
// vectors from it. Rows are split across threads; each thread keeps its own column sums, added
// up at the end. The inner loops are compiled for AVX-512, AVX2 with FMA and plain x86-64, chosen at load
// time (target_clones), so a cached build runs on any x86-64 machine.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

namespace {

// The product loops are compiled for AVX-512, AVX2 with FMA (x86-64-v3) and plain x86-64, chosen
// at load time. They may contract a product and its sum into one fused multiply-add: for float32
// sources that changes nothing (the product of two floats is exact in double, so only the sum
// rounds, once either way); for float64 sources it rounds once where a multiply and an add
// round twice. Everything else (Adam's step) is built with -ffp-contract=off.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SYMMECH_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#define SYMMECH_PRODUCTS SYMMECH_CLONES __attribute__((optimize("fp-contract=fast")))
#else
#define SYMMECH_CLONES
#define SYMMECH_PRODUCTS
#endif

// What a pair's element-wise product is: x alone (a sum), x·x (one conversion per element), or
// x·y.
enum class Kind { kSum, kSquare, kCross };

template <typename T, Kind K>
inline double product(const T* x, const T* y, int64_t c) {
  const double a = static_cast<double>(x[c]);
  if (K == Kind::kSum) return a;
  if (K == Kind::kSquare) return a * a;
  return a * static_cast<double>(y[c]);
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

// Adam's scalars in the tensors' precision, and its step over a block of elements.
template <typename T>
struct AdamStep {
  T w, wc, b2, c2, bc, eps;
  bool low;  // torch's lerp: the form that is exact at its nearer end

  AdamStep(double w1, double beta2, double bc2_sqrt, double e)
      : w(static_cast<T>(w1)),
        wc(static_cast<T>(1.0 - w1)),
        b2(static_cast<T>(beta2)),
        c2(static_cast<T>(1.0 - beta2)),
        bc(static_cast<T>(bc2_sqrt)),
        eps(static_cast<T>(e)),
        low(w1 < 0.5) {}

  void operator()(const T* g, const T* m, const T* v, const T* vmax, T* a, int64_t n) const {
    if (low && vmax == nullptr) adam_block<T, true, false>(g, m, v, vmax, a, n, w, wc, b2, c2, bc, eps);
    if (low && vmax != nullptr) adam_block<T, true, true>(g, m, v, vmax, a, n, w, wc, b2, c2, bc, eps);
    if (!low && vmax == nullptr) adam_block<T, false, false>(g, m, v, vmax, a, n, w, wc, b2, c2, bc, eps);
    if (!low && vmax != nullptr) adam_block<T, false, true>(g, m, v, vmax, a, n, w, wc, b2, c2, bc, eps);
  }
};

template <typename T>
void adam_direction_into(const T* g, const T* m, const T* v, const T* vmax, T* a, int64_t n,
                         double w1, double beta2, double bc2_sqrt, double eps) {
  const AdamStep<T> step(w1, beta2, bc2_sqrt, eps);
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    step(g + begin, m + begin, v + begin, vmax != nullptr ? vmax + begin : nullptr, a + begin,
         end - begin);
  });
}

// A tensor's source made in the sweep, row block by row block, never stored: Adam's coming
// step from the sources g, m, v (and the running maximum under amsgrad).
template <typename T>
struct MadeStep {
  const T *g, *m, *v, *vmax;
  AdamStep<T> step;
  int64_t index;  // its source number in the pairs
};


// A column's sum with four rows' products added one at a time (in the product loops each add
// then contracts into a multiply-add with its product).
inline double plus4(double col, double p0, double p1, double p2, double p3) {
  return (((col + p0) + p1) + p2) + p3;
}

// Four rows of n columns: each row's sum of the pair's products added to acc[0..3], and each
// column's sum over the four added to cols (one read-modify-write per column).
template <typename T, Kind K>
SYMMECH_PRODUCTS void rows4(const T* x, const T* y, int64_t n, double* acc, double* cols) {
  const T *x0 = x, *x1 = x + n, *x2 = x + 2 * n, *x3 = x + 3 * n;
  const T *y0 = y, *y1 = y + n, *y2 = y + 2 * n, *y3 = y + 3 * n;
  double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t c = 0; c < n; ++c) {
    const double p0 = product<T, K>(x0, y0, c), p1 = product<T, K>(x1, y1, c);
    const double p2 = product<T, K>(x2, y2, c), p3 = product<T, K>(x3, y3, c);
    a0 += p0;
    a1 += p1;
    a2 += p2;
    a3 += p3;
    cols[c] = plus4(cols[c], p0, p1, p2, p3);
  }
  acc[0] += a0;
  acc[1] += a1;
  acc[2] += a2;
  acc[3] += a3;
}

// One row, columns [0, n): its sum of the pair's products; with COLS each product is also added
// to its column's sum.
template <typename T, Kind K, bool COLS>
SYMMECH_PRODUCTS double row1(const T* x, const T* y, int64_t n, double* cols) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < n; ++c) {
    const double v = product<T, K>(x, y, c);
    acc += v;
    if (COLS) cols[c] += v;
  }
  return acc;
}

// Four rows of n columns, two pairs that share their first source: x·x and x·y (θ·θ and θ·g
// on a logged step, a·a and a·θ under Adam), each element of x converted once; row sums added
// to sq[0..3] and cross[0..3], column sums to sq_cols and cross_cols.
template <typename T>
SYMMECH_PRODUCTS void rows4_square_cross(const T* x, const T* y, int64_t n, double* sq,
                                       double* cross, double* sq_cols, double* cross_cols) {
  const T *x0 = x, *x1 = x + n, *x2 = x + 2 * n, *x3 = x + 3 * n;
  const T *y0 = y, *y1 = y + n, *y2 = y + 2 * n, *y3 = y + 3 * n;
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0, c0 = 0.0, c1 = 0.0, c2 = 0.0, c3 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, c0, c1, c2, c3)
  for (int64_t c = 0; c < n; ++c) {
    const double a0 = static_cast<double>(x0[c]), a1 = static_cast<double>(x1[c]);
    const double a2 = static_cast<double>(x2[c]), a3 = static_cast<double>(x3[c]);
    const double q0 = a0 * a0, q1 = a1 * a1, q2 = a2 * a2, q3 = a3 * a3;
    const double p0 = a0 * static_cast<double>(y0[c]), p1 = a1 * static_cast<double>(y1[c]);
    const double p2 = a2 * static_cast<double>(y2[c]), p3 = a3 * static_cast<double>(y3[c]);
    s0 += q0;
    s1 += q1;
    s2 += q2;
    s3 += q3;
    c0 += p0;
    c1 += p1;
    c2 += p2;
    c3 += p3;
    sq_cols[c] = plus4(sq_cols[c], q0, q1, q2, q3);
    cross_cols[c] = plus4(cross_cols[c], p0, p1, p2, p3);
  }
  sq[0] += s0;
  sq[1] += s1;
  sq[2] += s2;
  sq[3] += s3;
  cross[0] += c0;
  cross[1] += c1;
  cross[2] += c2;
  cross[3] += c3;
}

// One row of n columns, x·x and x·y in one pass (with COLS, each also added to its column sums).
template <typename T, bool COLS>
SYMMECH_PRODUCTS void row1_square_cross(const T* x, const T* y, int64_t n, double* sq,
                                      double* cross, double* sq_cols, double* cross_cols) {
  double s0 = 0.0, c0 = 0.0;
#pragma omp simd reduction(+ : s0, c0)
  for (int64_t c = 0; c < n; ++c) {
    const double a = static_cast<double>(x[c]);
    const double q = a * a, p = a * static_cast<double>(y[c]);
    s0 += q;
    c0 += p;
    if (COLS) {
      sq_cols[c] += q;
      cross_cols[c] += p;
    }
  }
  *sq = s0;
  *cross = c0;
}

// Rows r0 .. r0 + rn (rn ≤ 4) of one pair: with column sums, four rows at once (one
// read-modify-write of the column sums per four rows); without, row by row (one long
// contiguous stream per source).
template <typename T, Kind K>
void block_pair(const T* x, const T* y, int64_t C, int64_t rn, double* acc, double* cols) {
  if (cols != nullptr && rn == 4) {
    rows4<T, K>(x, y, C, acc, cols);
    return;
  }
  for (int64_t k = 0; k < rn; ++k) {
    acc[k] = cols != nullptr ? row1<T, K, true>(x + k * C, y + k * C, C, cols)
                             : row1<T, K, false>(x + k * C, y + k * C, C, nullptr);
  }
}

// One tensor viewed as rows R × columns C: for each pair p (second index -1: the first source
// alone), rows[p, r] = Σ_c x[r, c] y[r, c] and, with want_cols, cols[p, c] = Σ_r x[r, c] y[r, c],
// accumulated in double. Threads take blocks of four rows; each keeps its own column sums, and
// makes the block's rows of ``made`` (when given) in a buffer of its own before the pairs read
// them.
template <typename T>
void sweep(const std::vector<const T*>& src, const std::vector<int64_t>& pairs, int64_t R,
           int64_t C, bool want_cols, double* rows, double* cols, const MadeStep<T>* made) {
  const int64_t P = static_cast<int64_t>(pairs.size() / 2);
  const int threads = want_cols ? at::get_num_threads() : 1;
  std::vector<double> partial(want_cols ? static_cast<size_t>(threads) * P * C : 0, 0.0);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(C * P, 1));
  const int64_t blocks = (R + 3) / 4;
  // two pairs x·x and x·y (either order): the index of the square, read with the cross in one
  // pass when the column sums are asked for too (-1: each pair on its own)
  int64_t square_cross = -1;
  if (P == 2 && pairs[1] >= 0 && pairs[3] >= 0) {
    for (int64_t sq = 0; sq < 2 && square_cross < 0; ++sq) {
      const int64_t i = pairs[2 * sq], a = pairs[2 * (1 - sq)], b = pairs[2 * (1 - sq) + 1];
      if (pairs[2 * sq + 1] == i && (a == i) != (b == i)) square_cross = sq;
    }
  }
  at::parallel_for(0, blocks, std::max<int64_t>(1, grain / 4), [&](int64_t begin, int64_t end) {
    double* mine = want_cols ? partial.data() + static_cast<size_t>(at::get_thread_num()) * P * C
                             : nullptr;
    std::vector<T> buffer(made != nullptr ? static_cast<size_t>(4 * C) : 0);
    double acc[4], cross[4];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = 4 * block, rn = std::min<int64_t>(4, R - r0);
      if (made != nullptr) {
        const int64_t at = r0 * C;
        made->step(made->g + at, made->m + at, made->v + at,
                   made->vmax != nullptr ? made->vmax + at : nullptr, buffer.data(), rn * C);
      }
      auto row = [&](int64_t s) -> const T* {
        return made != nullptr && s == made->index ? buffer.data() : src[s] + r0 * C;
      };
      if (square_cross >= 0) {  // both pairs in one pass
        const int64_t sq = square_cross, cr = 1 - square_cross;
        const T* x = row(pairs[2 * sq]);
        const T* y = row(pairs[2 * cr] == pairs[2 * sq] ? pairs[2 * cr + 1] : pairs[2 * cr]);
        double* sq_cols = mine != nullptr ? mine + sq * C : nullptr;
        double* cross_cols = mine != nullptr ? mine + cr * C : nullptr;
        acc[0] = acc[1] = acc[2] = acc[3] = 0.0;
        cross[0] = cross[1] = cross[2] = cross[3] = 0.0;
        if (mine != nullptr && rn == 4) {
          rows4_square_cross<T>(x, y, C, acc, cross, sq_cols, cross_cols);
        } else {
          for (int64_t k = 0; k < rn; ++k) {
            if (mine != nullptr) {
              row1_square_cross<T, true>(x + k * C, y + k * C, C, acc + k, cross + k, sq_cols,
                                         cross_cols);
            } else {
              row1_square_cross<T, false>(x + k * C, y + k * C, C, acc + k, cross + k, nullptr,
                                          nullptr);
            }
          }
        }
        for (int64_t k = 0; k < rn; ++k) {
          rows[sq * R + r0 + k] = acc[k];
          rows[cr * R + r0 + k] = cross[k];
        }
        continue;
      }
      for (int64_t p = 0; p < P; ++p) {
        const T* x = row(pairs[2 * p]);
        const bool ones = pairs[2 * p + 1] < 0;
        const T* y = ones ? x : row(pairs[2 * p + 1]);
        double* col = mine != nullptr ? mine + p * C : nullptr;
        acc[0] = acc[1] = acc[2] = acc[3] = 0.0;
        if (ones) {
          block_pair<T, Kind::kSum>(x, y, C, rn, acc, col);
        } else if (pairs[2 * p] == pairs[2 * p + 1]) {
          block_pair<T, Kind::kSquare>(x, y, C, rn, acc, col);
        } else {
          block_pair<T, Kind::kCross>(x, y, C, rn, acc, col);
        }
        for (int64_t k = 0; k < rn; ++k) rows[p * R + r0 + k] = acc[k];
      }
    }
  });
  if (want_cols) {
    std::fill(cols, cols + P * C, 0.0);
    for (int t = 0; t < threads; ++t) {
      const double* part = partial.data() + static_cast<size_t>(t) * P * C;
      for (int64_t k = 0; k < P * C; ++k) cols[k] += part[k];
    }
  }
}

// The column sums (C values) of a tensor of ``shape`` summed over every dimension but ``dim``
// (≥ 1): G = shape[dim] values written to ``out``.
void column_groups(const double* cols, int64_t C, at::IntArrayRef shape, int64_t dim,
                   double* out) {
  const int64_t G = shape[dim];
  int64_t inner = 1;
  for (int64_t d = dim + 1; d < static_cast<int64_t>(shape.size()); ++d) inner *= shape[d];
  const int64_t outer = G * inner == 0 ? 0 : C / (G * inner);
  std::fill(out, out + G, 0.0);
  for (int64_t a = 0; a < outer; ++a) {
    for (int64_t g = 0; g < G; ++g) {
      const double* x = cols + (a * G + g) * inner;
      double acc = 0.0;
      for (int64_t i = 0; i < inner; ++i) acc += x[i];
      out[g] += acc;
    }
  }
}

// Whether the kernel reads these sources: contiguous CPU float32/float64 tensors of one shape
// and dtype with at least one dimension (native.eligible says the same in Python).
bool readable(const std::vector<torch::Tensor>& s) {
  if (s.empty() || s[0].dim() < 1) return false;
  const auto type = s[0].scalar_type();
  if (type != torch::kFloat32 && type != torch::kFloat64) return false;
  for (const auto& x : s) {
    if (!x.device().is_cpu() || !x.is_contiguous() || x.sizes() != s[0].sizes() ||
        x.scalar_type() != type) {
      return false;
    }
  }
  return true;
}

template <typename T>
void products_of(const std::vector<torch::Tensor>& s, const std::vector<int64_t>& pairs,
                 const std::vector<int64_t>& dims, const std::vector<int64_t>& made_from,
                 const std::vector<double>& scalars, double* out) {
  const int64_t P = static_cast<int64_t>(pairs.size() / 2);
  const int64_t R = s[0].size(0);
  const int64_t C = R == 0 ? 0 : s[0].numel() / R;
  bool want_cols = false;
  for (int64_t d : dims) want_cols = want_cols || d > 0;
  std::vector<const T*> src;
  for (const auto& x : s) src.push_back(x.data_ptr<T>());
  std::unique_ptr<MadeStep<T>> made;
  if (!made_from.empty()) {
    made.reset(new MadeStep<T>{src[made_from[0]], src[made_from[1]], src[made_from[2]],
                               made_from[3] < 0 ? nullptr : src[made_from[3]],
                               AdamStep<T>(scalars[0], scalars[1], scalars[2], scalars[3]),
                               static_cast<int64_t>(s.size())});
  }
  std::vector<double> rows(static_cast<size_t>(P * R)), cols(want_cols ? P * C : 0);
  sweep<T>(src, pairs, R, C, want_cols, rows.data(), cols.data(), made.get());
  for (int64_t d : dims) {
    for (int64_t p = 0; p < P; ++p) {
      const double* r = rows.data() + p * R;
      if (d == 0) {
        std::copy(r, r + R, out);
        out += R;
      } else if (d < 0) {
        double total = 0.0;
        for (int64_t k = 0; k < R; ++k) total += r[k];
        *out++ = total;
      } else {
        column_groups(cols.data() + p * C, C, s[0].sizes(), d, out);
        out += s[0].size(d);
      }
    }
  }
}

// Every product of a hook call, in double, written into ``out``: for tensor t (its sources
// sources[t], of one shape) at offsets[t], for each dimension of dims[t] in order and each pair
// of pairs[t] ((i, j) flat; j = -1: source i alone, a sum) in order, the per-group sums: G =
// the size of that dimension (dimension 0: the rows), or one value for dimension -1 (the
// whole tensor). With made[t] = (g, m, v, vmax or -1), source numbers of t, and scalars[t] =
// (1 - β₁, β₂, √(1 - β₂ᵏ), ε), source number len(sources[t]) is Adam's coming step, made from
// them as adam_direction makes it (the same values) and never stored. Returns the tensors it
// did not read (not contiguous CPU float32/float64, or without a dimension): their places in
// ``out`` are left as they were.
std::vector<int64_t> products(const std::vector<std::vector<torch::Tensor>>& sources,
                              const std::vector<std::vector<int64_t>>& pairs,
                              const std::vector<std::vector<int64_t>>& dims,
                              const std::vector<int64_t>& offsets, torch::Tensor& out,
                              const std::vector<std::vector<int64_t>>& made,
                              const std::vector<std::vector<double>>& scalars) {
  TORCH_CHECK(sources.size() == pairs.size() && pairs.size() == dims.size() &&
                  dims.size() == offsets.size() &&
                  (made.empty() || (made.size() == sources.size() && scalars.size() == made.size())),
              "products: per tensor one list of sources, pairs, dimensions (and made steps) "
              "and one offset");
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.scalar_type() == torch::kFloat64,
              "products: out must be a contiguous CPU float64 tensor");
  const std::vector<int64_t> none;
  const std::vector<double> no_scalars;
  std::vector<int64_t> skipped;
  double* base = out.data_ptr<double>();
  for (size_t t = 0; t < sources.size(); ++t) {
    const auto& s = sources[t];
    if (!readable(s)) {
      skipped.push_back(static_cast<int64_t>(t));
      continue;
    }
    const auto& made_from = made.empty() ? none : made[t];
    const int64_t n = static_cast<int64_t>(s.size()), nd = s[0].dim();
    TORCH_CHECK(made_from.empty() || (made_from.size() == 4 && scalars[t].size() == 4),
                "products: tensor ", t, "'s made step needs 4 source numbers and 4 scalars");
    for (size_t k = 0; k < made_from.size(); ++k) {
      TORCH_CHECK(made_from[k] < n && (made_from[k] >= 0 || (k == 3 && made_from[k] == -1)),
                  "products: tensor ", t, "'s made step reads source ", made_from[k],
                  " of ", n);
    }
    const int64_t count = n + (made_from.empty() ? 0 : 1);
    TORCH_CHECK(pairs[t].size() % 2 == 0, "products: tensor ", t, " has an odd pair list");
    for (size_t k = 0; k < pairs[t].size(); ++k) {
      const int64_t i = pairs[t][k];
      TORCH_CHECK(i < count && (i >= 0 || (k % 2 == 1 && i == -1)), "products: pair index ", i,
                  " out of range for tensor ", t);
    }
    int64_t size = 0;
    for (int64_t d : dims[t]) {
      TORCH_CHECK(d >= -1 && d < nd, "products: dimension ", d, " out of range for tensor ", t);
      size += (d < 0 ? 1 : s[0].size(d)) * static_cast<int64_t>(pairs[t].size() / 2);
    }
    TORCH_CHECK(offsets[t] >= 0 && offsets[t] + size <= out.numel(), "products: tensor ", t,
                "'s values do not fit in out");
    const auto& sc = made_from.empty() ? no_scalars : scalars[t];
    if (s[0].scalar_type() == torch::kFloat32) {
      products_of<float>(s, pairs[t], dims[t], made_from, sc, base + offsets[t]);
    } else {
      products_of<double>(s, pairs[t], dims[t], made_from, sc, base + offsets[t]);
    }
  }
  return skipped;
}

// out[dst[k]] += values[src[k]] · coef[k] for every k: the bank vectors from the products.
void scatter(const torch::Tensor& values, const torch::Tensor& src, const torch::Tensor& dst,
             const torch::Tensor& coef, torch::Tensor& out) {
  for (const torch::Tensor* t : {&values, &coef, static_cast<const torch::Tensor*>(&out)}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == torch::kFloat64,
                "scatter: values, coef and out must be contiguous CPU float64 tensors");
  }
  for (const auto* t : {&src, &dst}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == torch::kInt64 &&
                    t->numel() == coef.numel(),
                "scatter: src and dst must be contiguous CPU int64 tensors of coef's length");
  }
  const double* v = values.data_ptr<double>();
  const double* c = coef.data_ptr<double>();
  const int64_t* s = src.data_ptr<int64_t>();
  const int64_t* d = dst.data_ptr<int64_t>();
  double* o = out.data_ptr<double>();
  const int64_t nv = values.numel(), no = out.numel(), n = coef.numel();
  for (int64_t k = 0; k < n; ++k) {
    TORCH_CHECK(s[k] >= 0 && s[k] < nv && d[k] >= 0 && d[k] < no, "scatter: index out of range");
    o[d[k]] += v[s[k]] * c[k];
  }
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
  m.def("products", &products,
        "Per-group sums of products of equal-shaped tensors, one sweep each, into one vector");
  m.def("scatter", &scatter, "out[dst] += values[src] * coef");
  m.def("adam_direction", &adam_direction,
        "Adam's coming step from g, m and v in one pass (torch's order of operations)");
}
