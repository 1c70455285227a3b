// Multi-SK, linear domain, on CPU: every Sinkhorn iteration in one pass over the N x K state.
//
// The XLA custom call `msk_multisk_linear` runs the iterations of msk_jax.sinkhorn._solve_linear
// (see that function for the algebra) on a stack of P problems. XLA on CPU cannot fuse an
// elementwise update with both its row and its column sums, so the pure-JAX loop makes about
// ten passes over the N x K matrices per iteration; here one pass per iteration reads x and the
// kernel, writes x in place, and accumulates the row sums and the column sums on the way (every
// row scaling of step (c) depends on its own row only). The float32 expressions are those of
// the JAX code, in the same order; sums are accumulated in float over short runs and in double
// beyond, in an order that does not depend on the thread count.
//
// Threads: XLA's CPU thread pool (the FFI call context's ffi::ThreadPool). A pass over the
// matrices is cut into chunks of 256 rows of every problem, which the calling thread and the
// pool's threads take in turn (see Job), so one call uses the whole pool for one problem or many.
//
// Layout: the N x K matrices are kept in blocks of kLanes rows (16 with AVX-512, else 8),
// block-major and row-minor, (ceil(N / kLanes), K, kLanes): one vector holds one anchor of
// kLanes samples, so the row sums are elementwise vector sums, and the column sums are reduced
// across lanes once per 256 rows.
// Padding rows are zero and stay zero. The first pass reads the scores (row-major), takes the
// exponentials and writes both matrices in this layout.
//
// Inputs:  scores (..., N, K)  similarities, row-major
//          c (..., K)          the anchor marginal
//          shifts (..., 3)     top, gap_top, exp(gap_top): the logits' shifts (see _solve_linear)
// Attrs:   weight_b, inv_eps, gap (float32: x = exp(weight_b * S * inv_eps - top), kernel =
//          exp(gap * S - gap_top)), count_b, count_o (float32 slot counts; count_o = 0: one
//          slot group), num_iters, last_rows (rows of the target returned).
// Outputs: x, kernel (..., ceil(N / 16), K, 16): room for the working matrices; target (..., last_rows,
//          K): the required group after the final renormalisation over anchors, row-major;
//          marginal_error (...).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kDamping = 1e-5f;
// Rows per block: one vector register of floats (16 with AVX-512, else 8: a 16-float vector
// without AVX-512 is split by the compiler and passed through memory, about 3x slower).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
constexpr int64_t kChunkBlocks = 256 / kLanes;  // blocks per chunk (256 rows): a thread's unit of work

typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline Lanes Load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(Lanes));
  return v;
}
inline void Store(float* p, Lanes v) { std::memcpy(p, &v, sizeof(Lanes)); }
inline Lanes Splat(float s) { return Lanes{} + s; }
inline Lanes Abs(Lanes v) { return v < 0 ? -v : v; }
inline Lanes Max(Lanes a, Lanes b) { return a > b ? a : b; }

typedef int32_t IntLanes __attribute__((vector_size(kLanes * sizeof(int32_t))));

// exp(v) for v in [-87, 0] (the linear domain's logits are shifted to <= 0 and span <= 50):
// Cody-Waite range reduction and the Cephes expf polynomial, within 2 ulp of exp.
inline Lanes Exp(Lanes v) {
  v = v < -87.0f ? Splat(-87.0f) : v;
  const Lanes t = v * 1.44269504088896341f + 0.5f;
  IntLanes ni = __builtin_convertvector(t, IntLanes);
  ni = ni - (__builtin_convertvector(ni, Lanes) > t ? 1 : 0);  // floor
  const Lanes n = __builtin_convertvector(ni, Lanes);
  const Lanes r = (v - n * 0.693359375f) - n * -2.12194440e-4f;
  Lanes p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  IntLanes bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits = bits + (ni << 23);
  Lanes out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Sum of the lanes in a fixed tree (halves added pairwise).
inline double LaneSum(Lanes v) {
  float t[kLanes];
  for (int l = 0; l < kLanes; ++l) t[l] = v[l];
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) t[l] = t[l] + t[l + width];
  return static_cast<double>(t[0]);
}

struct Settings {
  int64_t n, blocks, k, last_rows, num_iters;
  float count_b, count_o;
  bool two_groups;
  float weight_b, inv_eps, gap;
};

// One problem's state. Its rows are cut into chunks of kChunkBlocks blocks (256 rows), the unit
// of work of a thread; every sum over rows is kept per block or per chunk and added up in row
// order, so the results do not depend on how many threads ran or which chunk each took.
struct Problem {
  const float* scores;
  float* x;
  float* kernel;
  const float* c;
  float top, gap_top, scale_o;
  float* target;
  float* error;
  // Per row (padded to whole blocks): the row scalings r and row sums of both groups.
  std::vector<float> r_b, r_o, row_b, row_o;
  // Per block: the exponentials' sums of both groups [blocks][2]. Per chunk: the column sums
  // of both groups [chunks][2][K], and the row and slot errors [chunks][2].
  std::vector<double> totals, partial;
  std::vector<float> errors;
  // Per anchor, set between two passes: the column sums, the scalings of the next pass.
  std::vector<float> col_b, col_o, u, u_next, alpha_b;
  float r_b0 = 0.0f, r_o0 = 0.0f;
  // Chunks of the current pass finished (the last one to finish reduces the problem).
  std::atomic<int64_t> done{0};

  Problem(const Settings& s, int64_t chunks)
      : r_b(s.blocks * kLanes), r_o(s.blocks * kLanes), row_b(s.blocks * kLanes),
        row_o(s.blocks * kLanes), totals(2 * s.blocks), partial(chunks * 2 * s.k),
        errors(2 * chunks), col_b(s.k), col_o(s.k), u(s.k, 1.0f), u_next(s.k, 1.0f),
        alpha_b(s.k) {}

  double* Partial(int64_t chunk, int group, int64_t k) { return partial.data() + (chunk * 2 + group) * k; }

  // Column sums of one group: the chunks' partials added in row order.
  void SumPartials(int group, int64_t k, int64_t chunks, float* out) {
    for (int64_t j = 0; j < k; ++j) {
      double total = 0.0;
      for (int64_t q = 0; q < chunks; ++q) total += Partial(q, group, k)[j];
      out[j] = static_cast<float>(total);
    }
  }
};

// Column sums of one chunk: float lanes per anchor, added up in double at the end of the chunk.
class ColumnSums {
 public:
  explicit ColumnSums(int64_t k) : k_(k), lanes_b_(k), lanes_o_(k) {}
  // Before a chunk: where its sums go, and cleared accumulators.
  void Start(double* out_b, double* out_o) {
    out_b_ = out_b;
    out_o_ = out_o;
    std::fill(lanes_b_.begin(), lanes_b_.end(), Lanes{});
    std::fill(lanes_o_.begin(), lanes_o_.end(), Lanes{});
  }
  Lanes& b(int64_t j) { return lanes_b_[j]; }
  Lanes& o(int64_t j) { return lanes_o_[j]; }
  // After the chunk: its column sums, the lanes added in double.
  void Finish() {
    for (int64_t j = 0; j < k_; ++j) {
      out_b_[j] = LaneSum(lanes_b_[j]);
      out_o_[j] = LaneSum(lanes_o_[j]);
    }
  }

 private:
  int64_t k_;
  std::vector<Lanes> lanes_b_, lanes_o_;
  double *out_b_ = nullptr, *out_o_ = nullptr;
};

// Steps (b) and (c) on one block of kLanes rows (sinkhorn._solve_linear's `iteration`), the block's
// contribution to the column sums accumulated on the way. kTwoGroups = false: one slot group
// (R = K), where the kernel, u and the other group's sums are not used.
template <int KC, bool kTwoGroups>
inline void IterateBlock(float* __restrict xb, const float* __restrict kb, const float* alpha_b,
                         const float* u, float* __restrict scaled, Problem& p, int64_t row0,
                         const Settings& s, ColumnSums& cols) {
  const int64_t k = KC > 0 ? KC : s.k;
  const Lanes rb = Load(&p.r_b[row0]);
  const Lanes ratio = kTwoGroups ? Load(&p.r_o[row0]) / rb : Lanes{};
  Lanes sb[4] = {}, so[4] = {};
  for (int64_t j = 0; j < k; ++j) {
    const Lanes a_b = Load(xb + j * kLanes) * (rb * alpha_b[j]);                          // (b)
    if constexpr (kTwoGroups) {
      const Lanes kv = Load(kb + j * kLanes);
      const Lanes slots = s.count_b + (s.count_o * (kv * u[j])) * ratio;
      const Lanes xn = a_b / (a_b * slots + kDamping);
      const Lanes sc = xn * kv;
      Store(xb + j * kLanes, xn);
      Store(scaled + j * kLanes, sc);
      sb[j & 3] += xn;
      so[j & 3] += sc * u[j];
    } else {
      const Lanes xn = a_b / (s.count_b * a_b + kDamping);
      Store(xb + j * kLanes, xn);
      sb[j & 3] += xn;
    }
  }
  const Lanes sum_b = (sb[0] + sb[1]) + (sb[2] + sb[3]);                                 // (c)
  const Lanes r_b = 1.0f / (sum_b + kDamping);
  Store(&p.r_b[row0], r_b);
  Store(&p.row_b[row0], sum_b * r_b);
  if constexpr (kTwoGroups) {
    const Lanes sum_o = ((so[0] + so[1]) + (so[2] + so[3])) * ratio;
    const Lanes r_o = ratio / (sum_o + kDamping);
    Store(&p.r_o[row0], r_o);
    Store(&p.row_o[row0], sum_o / (sum_o + kDamping));
    for (int64_t j = 0; j < k; ++j) {
      cols.b(j) += r_b * Load(xb + j * kLanes);
      cols.o(j) += r_o * Load(scaled + j * kLanes);
    }
  } else {
    Store(&p.r_o[row0], r_b);
    Store(&p.row_o[row0], sum_b * r_b);
    for (int64_t j = 0; j < k; ++j) cols.b(j) += r_b * Load(xb + j * kLanes);
  }
}


// What a thread needs of its own while it works on a chunk.
struct Scratch {
  explicit Scratch(int64_t k) : tile(k * kLanes), scaled(k * kLanes), cols(k) {}
  std::vector<float> tile;    // one block of scores, transposed to (K, kLanes)
  std::vector<float> scaled;  // one block of x * kernel
  ColumnSums cols;
};

// Pass 0 on one chunk: the exponentials, in the blocked layout, and their row sums.
void ExponentialsChunk(Problem& p, const Settings& s, int64_t begin, int64_t end, Scratch& w) {
  const int64_t k = s.k, block_size = k * kLanes;
  float* tile = w.tile.data();
  for (int64_t b = begin; b < end; ++b) {
    float* xb = p.x + b * block_size;
    float* kb = p.kernel + b * block_size;
    const int64_t rows = std::min<int64_t>(kLanes, s.n - b * kLanes);
    const float* sb_rows = p.scores + b * kLanes * k;
    for (int64_t l = 0; l < rows; ++l)
      for (int64_t j = 0; j < k; ++j) tile[j * kLanes + l] = sb_rows[l * k + j];
    Lanes real = {};  // 1 for real rows, 0 for padding
    for (int l = 0; l < kLanes; ++l) real[l] = l < rows ? 1.0f : 0.0f;
    Lanes sb = {}, so = {};
    for (int64_t j = 0; j < k; ++j) {
      Lanes sv = Load(&tile[j * kLanes]);
      sv = real > 0 ? sv : Splat(0.0f);
      const Lanes xv = real * Exp((s.weight_b * sv) * s.inv_eps - p.top);
      Store(xb + j * kLanes, xv);
      sb += xv;
      if (s.two_groups) {
        const Lanes kv = real * Exp(s.gap * sv - p.gap_top);
        Store(kb + j * kLanes, kv);
        so += xv * kv;
      }
    }
    Store(&p.row_b[b * kLanes], sb);
    Store(&p.row_o[b * kLanes], so);
    p.totals[2 * b] = LaneSum(sb);
    p.totals[2 * b + 1] = LaneSum(so);
  }
}

// Pass 1 on one chunk: the initial row scalings (unit total mass) and the column sums.
void InitialChunk(Problem& p, const Settings& s, int64_t begin, int64_t end, Scratch& w) {
  const int64_t k = s.k, block_size = k * kLanes;
  for (int64_t b = begin; b < end; ++b) {
    const float* xb = p.x + b * block_size;
    const float* kb = p.kernel + b * block_size;
    const int64_t row0 = b * kLanes;
    Store(&p.r_b[row0], Splat(p.r_b0));
    Store(&p.r_o[row0], Splat(p.r_o0));
    Store(&p.row_b[row0], Load(&p.row_b[row0]) * p.r_b0);
    Store(&p.row_o[row0], s.two_groups ? Load(&p.row_o[row0]) * p.r_o0 : Load(&p.row_b[row0]));
    for (int64_t j = 0; j < k; ++j) {
      w.cols.b(j) += p.r_b0 * Load(xb + j * kLanes);
      if (s.two_groups) w.cols.o(j) += p.r_o0 * (Load(xb + j * kLanes) * Load(kb + j * kLanes));
    }
  }
}

// One Sinkhorn iteration on one chunk (steps (a)-(c), see IterateBlock).
template <int KC>
void IterationChunk(Problem& p, const Settings& s, int64_t begin, int64_t end, Scratch& w) {
  const int64_t block_size = (KC > 0 ? KC : s.k) * kLanes;
  for (int64_t b = begin; b < end; ++b) {
    if (s.two_groups) {
      IterateBlock<KC, true>(p.x + b * block_size, p.kernel + b * block_size, p.alpha_b.data(),
                             p.u_next.data(), w.scaled.data(), p, b * kLanes, s, w.cols);
    } else {
      IterateBlock<KC, false>(p.x + b * block_size, nullptr, p.alpha_b.data(), nullptr, nullptr, p,
                              b * kLanes, s, w.cols);
    }
  }
}

// Last pass on one chunk: the final renormalisation over anchors (the target rows) and the
// row and slot marginal errors.
void FinalChunk(Problem& p, const Settings& s, int64_t chunk, int64_t begin, int64_t end) {
  const int64_t k = s.k, block_size = k * kLanes;
  const int64_t first_target_row = s.n - s.last_rows;
  Lanes row_err = {}, slot_err = {};
  for (int64_t b = begin; b < end; ++b) {
    const float* xb = p.x + b * block_size;
    const float* kb = p.kernel + b * block_size;
    const int64_t row0 = b * kLanes;
    Lanes real = {};  // 1 for real rows, 0 for padding
    for (int l = 0; l < kLanes; ++l) real[l] = row0 + l < s.n ? 1.0f : 0.0f;
    const Lanes rb = Load(&p.r_b[row0]), ro = Load(&p.r_o[row0]);
    const Lanes row_b = Load(&p.row_b[row0]), row_o = Load(&p.row_o[row0]);
    row_err = Max(row_err, real * Max(Abs(row_b - 1.0f), Abs(row_o - 1.0f)));
    const bool has_target = row0 + kLanes > first_target_row;
    for (int64_t j = 0; j < k; ++j) {
      const Lanes xv = Load(xb + j * kLanes);
      const Lanes a_b = xv * rb;
      Lanes slot = s.count_b * a_b, required = a_b / row_b;
      if (s.two_groups) {
        const Lanes a_o = (xv * Load(kb + j * kLanes)) * (p.u[j] * ro);
        slot = slot + s.count_o * a_o;
        required = a_o / row_o;
      }
      slot_err = Max(slot_err, real * Abs(slot - 1.0f));
      if (has_target) {
        for (int l = 0; l < kLanes; ++l) {
          const int64_t row = row0 + l;
          if (row >= first_target_row && row < s.n) p.target[(row - first_target_row) * k + j] = required[l];
        }
      }
    }
  }
  float row_max = 0.0f, slot_max = 0.0f;
  for (int l = 0; l < kLanes; ++l) {
    row_max = std::max(row_max, row_err[l]);
    slot_max = std::max(slot_max, slot_err[l]);
  }
  p.errors[2 * chunk] = row_max;
  p.errors[2 * chunk + 1] = slot_max;
}

// A stack of problems solved pass by pass: every problem's chunks of a pass are handed out to
// whichever threads are working (the caller and the tasks it scheduled on XLA's thread pool),
// in tickets ordered by (pass, problem, chunk). The thread that finishes a problem's last chunk
// of a pass reduces that problem's sums; the one that reduces the last problem opens the next
// pass. A thread only ever waits for chunks that running threads have taken, so the solve
// finishes whatever number of pool threads join, none included.
struct Job {
  Job(const Settings& settings, int64_t problems)
      : s(settings), chunks((settings.blocks + kChunkBlocks - 1) / kChunkBlocks),
        items(problems * chunks), passes(settings.num_iters + 3) {
    pool.reserve(problems);
    for (int64_t q = 0; q < problems; ++q) pool.emplace_back(std::make_unique<Problem>(s, chunks));
  }

  const Settings s;
  const int64_t chunks, items, passes;  // pass 0 exponentials, 1 initial, 2.. iterations, last final
  std::vector<std::unique_ptr<Problem>> pool;
  std::atomic<int64_t> next_ticket{0}, reduced{0}, open_pass{0};

  void Work() {
    Scratch w(s.k);
    for (;;) {
      const int64_t ticket = next_ticket.fetch_add(1, std::memory_order_relaxed);
      if (ticket >= items * passes) return;
      const int64_t pass = ticket / items, problem = (ticket % items) / chunks, chunk = ticket % chunks;
      WaitForPass(pass);
      Problem& p = *pool[problem];
      RunChunk(p, pass, chunk, w);
      if (p.done.fetch_add(1, std::memory_order_acq_rel) + 1 == (pass + 1) * chunks) {
        Reduce(p, pass);
        if (reduced.fetch_add(1, std::memory_order_acq_rel) + 1 == (pass + 1) * static_cast<int64_t>(pool.size()))
          open_pass.store(pass + 1, std::memory_order_release);
      }
    }
  }

  void WaitForPass(int64_t pass) const {
    for (int spin = 0; open_pass.load(std::memory_order_acquire) < pass; ++spin) {
      if (spin > 2000) std::this_thread::yield();
    }
  }

  void RunChunk(Problem& p, int64_t pass, int64_t chunk, Scratch& w) {
    const int64_t begin = chunk * kChunkBlocks, end = std::min(s.blocks, begin + kChunkBlocks);
    if (pass == 0) return ExponentialsChunk(p, s, begin, end, w);
    if (pass == passes - 1) return FinalChunk(p, s, chunk, begin, end);
    w.cols.Start(p.Partial(chunk, 0, s.k), p.Partial(chunk, 1, s.k));
    if (pass == 1) {
      InitialChunk(p, s, begin, end, w);
    } else if (s.k == 64) {  // the paper's anchor count: a build with the anchor loop unrolled
      IterationChunk<64>(p, s, begin, end, w);
    } else {
      IterationChunk<0>(p, s, begin, end, w);
    }
    w.cols.Finish();
  }

  // After the problem's chunks of a pass: the sums over rows, and the scalings of the next pass.
  void Reduce(Problem& p, int64_t pass) {
    const int64_t k = s.k;
    if (pass == 0) {
      double sum_b = 0.0, sum_o = 0.0;
      for (int64_t b = 0; b < s.blocks; ++b) {
        sum_b += p.totals[2 * b];
        sum_o += p.totals[2 * b + 1];
      }
      if (s.two_groups) {
        const float total = s.count_b * static_cast<float>(sum_b) +
                            s.count_o * p.scale_o * static_cast<float>(sum_o);
        p.r_b0 = 1.0f / total;
        p.r_o0 = p.scale_o / total;
      } else {
        p.r_b0 = 1.0f / (s.count_b * static_cast<float>(sum_b));
        p.r_o0 = p.r_b0;
      }
      return;
    }
    if (pass == passes - 1) {
      float err = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        err = std::max(err, std::fabs(p.col_b[j] - p.c[j]) / p.c[j]);
        err = std::max(err, std::fabs(p.col_o[j] - p.c[j]) / p.c[j]);
      }
      for (int64_t q = 0; q < chunks; ++q) err = std::max(err, std::max(p.errors[2 * q], p.errors[2 * q + 1]));
      *p.error = err;
      return;
    }
    p.SumPartials(0, k, chunks, p.col_b.data());
    if (!s.two_groups) {
      p.col_o = p.col_b;
    } else {
      p.SumPartials(1, k, chunks, p.col_o.data());
      if (pass > 1) {  // an iteration: its column sums of the other group lack the factor u
        for (int64_t j = 0; j < k; ++j) p.col_o[j] = p.col_o[j] * p.u_next[j];
      }
    }
    if (pass > 1) p.u = p.u_next;
    if (pass + 1 < passes - 1) {  // the next pass is an iteration: its step (a)
      for (int64_t j = 0; j < k; ++j) {
        p.alpha_b[j] = p.c[j] / (p.col_b[j] + kDamping);
        p.u_next[j] = s.two_groups ? p.u[j] * ((p.col_b[j] + kDamping) / (p.col_o[j] + kDamping)) : p.u[j];
      }
    }
  }
};

ffi::Error MultiSKLinearImpl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> scores,
                             ffi::Buffer<ffi::F32> c, ffi::Buffer<ffi::F32> shifts, float weight_b,
                             float inv_eps, float gap, float count_b, float count_o,
                             int64_t num_iters, int64_t last_rows, ffi::ResultBuffer<ffi::F32> x,
                             ffi::ResultBuffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> target,
                             ffi::ResultBuffer<ffi::F32> error) {
  auto dims = scores.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("msk_multisk_linear: scores must be (..., N, K)");
  const int64_t n = dims[dims.size() - 2], k = dims[dims.size() - 1];
  const int64_t blocks = (n + kLanes - 1) / kLanes;
  if (n < 1 || k < 1 || last_rows < 1 || last_rows > n || num_iters < 0)
    return ffi::Error::InvalidArgument("msk_multisk_linear: invalid shape or settings");
  const int64_t problems = static_cast<int64_t>(scores.element_count()) / (n * k);
  if (problems == 0) return ffi::Error::Success();
  // Each problem's working matrices: at least blocks * K * kLanes floats (the caller pads the
  // rows to a multiple of 16, which holds a whole number of blocks of either width).
  const int64_t stride = static_cast<int64_t>(x->element_count()) / problems;
  if (static_cast<int64_t>(c.element_count()) != problems * k ||
      static_cast<int64_t>(shifts.element_count()) != problems * 3 ||
      stride < blocks * k * kLanes || static_cast<int64_t>(x->element_count()) != problems * stride ||
      static_cast<int64_t>(kernel->element_count()) != problems * stride)
    return ffi::Error::InvalidArgument("msk_multisk_linear: c, shifts or the outputs do not match the scores");
  const Settings s{n, blocks, k, last_rows, num_iters, count_b, count_o, count_o > 0.0f,
                   weight_b, inv_eps, gap};

  // Shared with the pool's tasks, which may start after the solve is done (they then find no
  // ticket left and only touch the job, which they keep alive).
  auto job = std::make_shared<Job>(s, problems);
  for (int64_t q = 0; q < problems; ++q) {
    Problem& p = *job->pool[q];
    p.scores = scores.typed_data() + q * n * k;
    p.x = x->typed_data() + q * stride;
    p.kernel = kernel->typed_data() + q * stride;
    p.c = c.typed_data() + q * k;
    p.top = shifts.typed_data()[3 * q];
    p.gap_top = shifts.typed_data()[3 * q + 1];
    p.scale_o = shifts.typed_data()[3 * q + 2];
    p.target = target->typed_data() + q * last_rows * k;
    p.error = error->typed_data() + q;
  }
  // The caller works too: at most one task per other pool thread, and no more than the
  // chunks of a pass can keep busy.
  const int64_t helpers = std::min<int64_t>(thread_pool.num_threads(), job->items) - 1;
  for (int64_t t = 0; t < helpers; ++t) thread_pool.Schedule([job] { job->Work(); });
  job->Work();
  job->WaitForPass(job->passes);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MskMultiSKLinear, MultiSKLinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("weight_b")
                                  .Attr<float>("inv_eps")
                                  .Attr<float>("gap")
                                  .Attr<float>("count_b")
                                  .Attr<float>("count_o")
                                  .Attr<int64_t>("num_iters")
                                  .Attr<int64_t>("last_rows")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
