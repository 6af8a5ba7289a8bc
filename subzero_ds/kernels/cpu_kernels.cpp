// The generate-and-apply of a ZO pass for shards on the host: Philox4x32-10 Gaussian directions
// and out = round(beta * src + alpha * d) in one pass over memory.
//
// The arithmetic is the one of philox.py, operation for operation (its docstring explains it): IEEE
// fp32 multiplies and adds only (built with -ffp-contract=off: no fused multiply-add), one
// correctly rounded sqrt, polynomials instead of libm. So the values are bit-identical to the
// torch reference and to the Triton kernel. Every element is computed by the same code path (whole
// blocks of counters into a local buffer), so a value never depends on where a slice starts.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
constexpr int kCounters = 64;                 // counters per block
constexpr int64_t kElements = 4 * kCounters;  // elements per block

inline float as_float(uint32_t bits) { float f; std::memcpy(&f, &bits, sizeof f); return f; }
inline uint32_t as_bits(float f) { uint32_t b; std::memcpy(&b, &f, sizeof b); return b; }

// The four words of counters [first, first + kCounters): word w of counter j at words[w][j].
void philox_block(int64_t first, uint32_t key0, uint32_t key1, uint32_t words[4][kCounters]) {
  for (int j = 0; j < kCounters; ++j) {
    const uint64_t counter = static_cast<uint64_t>(first + j);
    uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = key0, k1 = key1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0, p1 = static_cast<uint64_t>(kMul1) * c2;
      c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    words[0][j] = c0; words[1][j] = c1; words[2][j] = c2; words[3][j] = c3;
  }
}

// N(0,1) values of the elements of counters [first, first + kCounters), in element order.
void normal_block(int64_t first, uint32_t key0, uint32_t key1, float* out) {
  uint32_t words[4][kCounters];
  philox_block(first, key0, key1, words);
  uint32_t a[2 * kCounters], b[2 * kCounters];  // pair p of counter j at p * kCounters + j
  std::memcpy(a, words[0], sizeof words[0]);
  std::memcpy(a + kCounters, words[2], sizeof words[2]);
  std::memcpy(b, words[1], sizeof words[1]);
  std::memcpy(b + kCounters, words[3], sizeof words[3]);
  float cos_part[2 * kCounters], sin_part[2 * kCounters];
  for (int j = 0; j < 2 * kCounters; ++j) {
    // log u, u = k / 2^24, k = 2^24 - (a >> 8) in [1, 2^24]: k = m 2^e exactly, m in [sqrt(1/2), sqrt(2)).
    const uint32_t bits = as_bits(static_cast<float>(static_cast<int32_t>(16777216u - (a[j] >> 8))));
    int32_t exponent = static_cast<int32_t>(bits >> 23) - 126;
    const float mantissa = as_float((bits & 0x007FFFFFu) | 0x3F000000u);
    const int32_t small = mantissa < 0x1.6a09e6p-1f;
    exponent -= small;
    const float x = mantissa * static_cast<float>(1 + small) - 1.0f;
    const float scaled_exponent = static_cast<float>(exponent - 24);
    const float z = x * x;
    float y = 0x1.204376p-4f;
    y = y * x + -0x1.d7a370p-4f;
    y = y * x + 0x1.de4a34p-4f;
    y = y * x + -0x1.fcba9ep-4f;
    y = y * x + 0x1.23d37ep-3f;
    y = y * x + -0x1.555ca0p-3f;
    y = y * x + 0x1.999d58p-3f;
    y = y * x + -0x1.fffff8p-3f;
    y = y * x + 0x1.555554p-2f;
    y = y * x * z;
    y = y + scaled_exponent * -0x1.bd0106p-13f;
    y = y - 0.5f * z;
    float log_u = x + y;
    log_u = log_u + scaled_exponent * 0x1.63p-1f;
    const float radius = std::sqrt(-2.0f * log_u);
    // angle = 2 pi b24 / 2^24: quadrant and remainder from the integer, exactly.
    const int32_t b24 = static_cast<int32_t>(b[j] >> 8);
    const int32_t quadrant = (b24 + (1 << 21)) >> 22;  // 0 .. 4
    const float t = static_cast<float>(b24 - (quadrant << 22)) * 0x1.921fb6p-22f;
    const float tz = t * t;
    const float sin_t = ((-0x1.9943f2p-13f * tz + 0x1.11073cp-7f) * tz + -0x1.555546p-3f) * tz * t + t;
    const float cos_t = ((0x1.99eb9cp-16f * tz + -0x1.6c0c34p-10f) * tz + 0x1.55554ap-5f) * tz * tz - 0.5f * tz + 1.0f;
    const uint32_t swap = static_cast<uint32_t>(quadrant & 1) * 0xFFFFFFFFu;  // branch-free: vectorizes
    uint32_t cos_bits = (as_bits(cos_t) & ~swap) | (as_bits(sin_t) & swap);
    uint32_t sin_bits = (as_bits(sin_t) & ~swap) | (as_bits(cos_t) & swap);
    cos_bits ^= static_cast<uint32_t>(((quadrant + 1) >> 1) & 1) << 31;
    sin_bits ^= static_cast<uint32_t>((quadrant >> 1) & 1) << 31;
    cos_part[j] = radius * as_float(cos_bits);
    sin_part[j] = radius * as_float(sin_bits);
  }
  for (int j = 0; j < kCounters; ++j) {
    out[4 * j] = cos_part[j];
    out[4 * j + 1] = sin_part[j];
    out[4 * j + 2] = cos_part[kCounters + j];
    out[4 * j + 3] = sin_part[kCounters + j];
  }
}

// 16 random bits per element (the low half of its word), for stochastic rounding.
void rounding_block(int64_t first, uint32_t key0, uint32_t key1, uint32_t* bits) {
  uint32_t words[4][kCounters];
  philox_block(first, key0, key1, words);
  for (int j = 0; j < kCounters; ++j)
    for (int w = 0; w < 4; ++w) bits[4 * j + w] = words[w][j] & 0xFFFFu;
}

template <typename T>
inline T round_to(float value, bool stochastic, uint32_t random16) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // On the bits, branch-free (vectorizes): stochastic, adding 16 random bits below the kept ones
    // rounds the magnitude up with probability equal to the dropped fraction (E[result] = value);
    // otherwise round to nearest even, as c10::BFloat16 does. Inf/NaN: to nearest (NaN -> qNaN).
    const uint32_t bits = as_bits(value);
    const bool finite = (bits & 0x7F800000u) != 0x7F800000u;
    const uint32_t bias = (stochastic && finite) ? random16 : 0x7FFFu + ((bits >> 16) & 1u);
    const bool nan = !finite && (bits & 0x007FFFFFu) != 0;
    const uint32_t rounded = nan ? 0x7FC00000u : bits + bias;
    return c10::BFloat16(static_cast<uint16_t>(rounded >> 16), c10::BFloat16::from_bits());
  }
  return static_cast<T>(value);  // fp32 exact; fp16 to nearest even
}

// A low-rank direction D = U · CVᵀ (U: m x r, cvt = μ Z Vᵀ: r x n, row-major fp32), element e at
// row e / n, column e % n: d = sum over k of u[row][k] * cvt[k][col], in increasing k, one multiply
// and one add each (as the Triton kernel and the torch reference do).
struct LowRank {
  const float* u;
  const float* cvt;
  int64_t rank, cols;
};

// fp32 lanes as wide as the build's registers (GCC vector extension): lane-wise IEEE multiplies and
// adds, exactly as the scalar operations, so the width changes no bit.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;  // AVX2, or pairs of SSE registers
#endif
typedef float Lanes __attribute__((vector_size(4 * kLanes)));
inline Lanes load_lanes(const float* p) { Lanes v; std::memcpy(&v, p, sizeof v); return v; }
inline void store_lanes(float* p, Lanes v) { std::memcpy(p, &v, sizeof v); }

// Columns [col, col + kLanes·kGroups) of one row: kLanes·kGroups independent sums over k (enough of
// them to hide the add latency), each in increasing k.
template <int kGroups>
inline void lowrank_columns(const LowRank& l, const float* u_row, int64_t col, float* out) {
  Lanes acc[kGroups];
  for (int g = 0; g < kGroups; ++g) acc[g] = Lanes{};
  for (int64_t k = 0; k < l.rank; ++k) {
    const Lanes uk = Lanes{} + u_row[k];
    const float* c = l.cvt + k * l.cols + col;
    for (int g = 0; g < kGroups; ++g) acc[g] = acc[g] + uk * load_lanes(c + kLanes * g);
  }
  for (int g = 0; g < kGroups; ++g) store_lanes(out + kLanes * g, acc[g]);
}

// d[e - base] for e in [lo, hi): runs of one row, 8 (then 1) registers of columns at a time.
void lowrank_fill(const LowRank& l, int64_t base, int64_t lo, int64_t hi, float* d) {
  for (int64_t e = lo; e < hi;) {
    const int64_t row = e / l.cols, col = e % l.cols, run = std::min(hi - e, l.cols - col);
    const float* u_row = l.u + row * l.rank;
    float* out = d + (e - base);
    int64_t j = 0;
    for (; j + 8 * kLanes <= run; j += 8 * kLanes) lowrank_columns<8>(l, u_row, col + j, out + j);
    for (; j + kLanes <= run; j += kLanes) lowrank_columns<1>(l, u_row, col + j, out + j);
    for (; j < run; ++j) {  // the tail: the same operations, one column at a time
      float acc = 0.0f;
      for (int64_t k = 0; k < l.rank; ++k) acc = acc + u_row[k] * l.cvt[k * l.cols + col + j];
      out[j] = acc;
    }
    e += run;
  }
}

enum class Source { kGaussian, kDense, kLowRank };

// out[i] = round(beta * src[i] + alpha * d[offset + i]) for the elements of one block: a branch-free loop.
template <typename T, bool kReadSrc, bool kStochastic>
void apply_block(T* out, const T* src, const float* d, const uint32_t* bits, int64_t count, float beta,
                                float alpha) {
  for (int64_t i = 0; i < count; ++i) {
    const float kept = kReadSrc ? beta * static_cast<float>(src[i]) : 0.0f;
    out[i] = round_to<T>(kept + alpha * d[i], kStochastic, kStochastic ? bits[i] : 0u);
  }
}

// out[i] = round(beta * src[i] + alpha * d[offset + i]), i in [0, n), d from `source`. Elements are
// visited in blocks aligned to a global grid of kElements. out and src may be the same memory; with
// beta == 0, src is not read (out may hold anything, NaN included).
template <typename T, bool kReadSrc, bool kStochastic>
void axpby(T* out, const T* src, int64_t n, float beta, float alpha, int64_t offset, Source source,
           uint32_t key0, uint32_t key1, const float* dense, const LowRank& lowrank, uint32_t rkey0, uint32_t rkey1) {
  const int64_t first_block = offset / kElements, end_block = (offset + n + kElements - 1) / kElements;
  at::parallel_for(first_block, end_block, 16, [&](int64_t begin, int64_t end) {
    float d[kElements];
    uint32_t bits[kElements] = {0};
    for (int64_t block = begin; block < end; ++block) {
      const int64_t base = block * kElements;
      const int64_t lo = std::max(base, offset), hi = std::min(base + kElements, offset + n);
      const float* direction = d + (lo - base);
      if (source == Source::kGaussian) normal_block(block * kCounters, key0, key1, d);
      if (source == Source::kLowRank) lowrank_fill(lowrank, base, lo, hi, d);
      if (source == Source::kDense) direction = dense + (lo - offset);
      if (kStochastic) rounding_block(block * kCounters, rkey0, rkey1, bits);
      apply_block<T, kReadSrc, kStochastic>(out + (lo - offset), src + (lo - offset), direction, bits + (lo - base),
                                            hi - lo, beta, alpha);
    }
  });
}

template <typename T>
void dispatch_axpby(T* out, const T* src, int64_t n, float beta, float alpha, int64_t offset, Source source,
                    uint32_t key0, uint32_t key1, const float* dense, const LowRank& lowrank, bool stochastic,
                    uint32_t rkey0, uint32_t rkey1) {
  const bool read_src = beta != 0.0f;
  if (read_src && stochastic) axpby<T, true, true>(out, src, n, beta, alpha, offset, source, key0, key1, dense, lowrank, rkey0, rkey1);
  else if (read_src) axpby<T, true, false>(out, src, n, beta, alpha, offset, source, key0, key1, dense, lowrank, rkey0, rkey1);
  else if (stochastic) axpby<T, false, true>(out, src, n, beta, alpha, offset, source, key0, key1, dense, lowrank, rkey0, rkey1);
  else axpby<T, false, false>(out, src, n, beta, alpha, offset, source, key0, key1, dense, lowrank, rkey0, rkey1);
}

void check_tensor(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

void check_fp32(const c10::optional<torch::Tensor>& t, const char* what) {
  check_tensor(*t, what);
  TORCH_CHECK(t->scalar_type() == torch::kFloat32, what, " must be float32");
}

// out = round(beta * src + alpha * d): d Gaussian (key), dense (fp32, like out), or low-rank u · cvt
// at flat position offset + i of the matrix.
void apply(torch::Tensor out, torch::Tensor src, c10::optional<torch::Tensor> dense, c10::optional<torch::Tensor> u,
           c10::optional<torch::Tensor> cvt, double beta, double alpha, int64_t key0, int64_t key1, int64_t offset,
           bool stochastic, int64_t rkey0, int64_t rkey1) {
  check_tensor(out, "out");
  check_tensor(src, "src");
  TORCH_CHECK(out.scalar_type() == src.scalar_type(), "out and src must have the same dtype");
  TORCH_CHECK(out.numel() == src.numel(), "out and src must have the same number of elements");
  Source source = Source::kGaussian;
  const float* dense_ptr = nullptr;
  LowRank lowrank{nullptr, nullptr, 0, 1};
  if (dense.has_value() && dense->defined()) {
    check_fp32(dense, "dense");
    TORCH_CHECK(dense->numel() == out.numel(), "dense must have as many elements as out");
    source = Source::kDense;
    dense_ptr = dense->data_ptr<float>();
  } else if (u.has_value() && u->defined()) {
    check_fp32(u, "u");
    check_fp32(cvt, "cvt");
    TORCH_CHECK(u->dim() == 2 && cvt->dim() == 2 && u->size(1) == cvt->size(0), "u (m x r) and cvt (r x n) must fit");
    TORCH_CHECK(offset + out.numel() <= u->size(0) * cvt->size(1), "the range must lie inside the m x n matrix");
    source = Source::kLowRank;
    lowrank = LowRank{u->data_ptr<float>(), cvt->data_ptr<float>(), u->size(1), cvt->size(1)};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "subzero_ds_apply", [&] {
    dispatch_axpby<scalar_t>(out.data_ptr<scalar_t>(), src.data_ptr<scalar_t>(), out.numel(), static_cast<float>(beta),
                    static_cast<float>(alpha), offset, source, static_cast<uint32_t>(key0),
                    static_cast<uint32_t>(key1), dense_ptr, lowrank, stochastic, static_cast<uint32_t>(rkey0),
                    static_cast<uint32_t>(rkey1));
  });
}

// Row k of core · vt: out_row[j] = sum over l of core_row[l] * vt[l][j], increasing l.
void core_row(const float* core_row, const float* vt, int64_t rank, int64_t cols, float* out_row) {
  for (int64_t j = 0; j < cols; ++j) out_row[j] = 0.0f;
  for (int64_t l = 0; l < rank; ++l) {
    const float ckl = core_row[l];
    const float* vl = vt + l * cols;
    for (int64_t j = 0; j < cols; ++j) out_row[j] = out_row[j] + ckl * vl[j];
  }
}

// out (r x n) = core (r x r) · vt (r x n), in a fixed order of operations.
void lowrank_core(torch::Tensor out, torch::Tensor core, torch::Tensor vt) {
  check_tensor(out, "out");
  check_tensor(core, "core");
  check_tensor(vt, "vt");
  const int64_t rank = core.size(0), cols = vt.size(1);
  TORCH_CHECK(core.size(1) == rank && vt.size(0) == rank && out.size(0) == rank && out.size(1) == cols,
              "core must be r x r, vt and out r x n");
  at::parallel_for(0, rank, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      core_row(core.data_ptr<float>() + k * rank, vt.data_ptr<float>(), rank, cols, out.data_ptr<float>() + k * cols);
  });
}

// The four Philox4x32-10 words of counters (c0, c1, c2, c3) and a key, for known-answer tests.
torch::Tensor philox_words(torch::Tensor counters, int64_t key0, int64_t key1) {
  TORCH_CHECK(counters.dim() == 2 && counters.size(1) == 4, "counters must be n x 4");
  auto c = counters.contiguous().to(torch::kInt64);
  auto out = torch::empty_like(c);
  const int64_t* in = c.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.size(0); ++i) {
    uint32_t c0 = static_cast<uint32_t>(in[4 * i]), c1 = static_cast<uint32_t>(in[4 * i + 1]);
    uint32_t c2 = static_cast<uint32_t>(in[4 * i + 2]), c3 = static_cast<uint32_t>(in[4 * i + 3]);
    uint32_t k0 = static_cast<uint32_t>(key0), k1 = static_cast<uint32_t>(key1);
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0, p1 = static_cast<uint64_t>(kMul1) * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0, n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1); c3 = static_cast<uint32_t>(p0); c0 = n0; c2 = n2;
      k0 += kWeyl0; k1 += kWeyl1;
    }
    dst[4 * i] = c0; dst[4 * i + 1] = c1; dst[4 * i + 2] = c2; dst[4 * i + 3] = c3;
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("apply", &apply, "out = round(beta * src + alpha * d), d Gaussian (Philox), dense or low-rank");
  m.def("lowrank_core", &lowrank_core, "out = core · vt in a fixed order of operations");
  m.def("philox_words", &philox_words, "Philox4x32-10 of n x 4 counters (known-answer tests)");
}
