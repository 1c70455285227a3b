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
// Layout: the N x K matrices are kept in blocks of 16 rows, block-major and row-minor,
// (ceil(N / 16), K, 16): one vector holds one anchor of 16 samples, so the row sums are
// elementwise vector sums, and the column sums are reduced across lanes once per 256 rows.
// Padding rows are zero and stay zero. The first pass reads the scores (row-major), takes the
// exponentials and writes both matrices in this layout.
//
// Inputs:  scores (..., N, K)  similarities, row-major
//          c (..., K)          the anchor marginal
//          shifts (..., 3)     top, gap_top, exp(gap_top): the logits' shifts (see _solve_linear)
// Attrs:   weight_b, inv_eps, gap (float32: x = exp(weight_b * S * inv_eps - top), kernel =
//          exp(gap * S - gap_top)), count_b, count_o (float32 slot counts; count_o = 0: one
//          slot group), num_iters, last_rows (rows of the target returned), threads.
// Outputs: x, kernel (..., ceil(N / 16), K, 16): the working matrices; target (..., last_rows,
//          K): the required group after the final renormalisation over anchors, row-major;
//          marginal_error (...).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kDamping = 1e-5f;
constexpr int kLanes = 16;              // rows per block
constexpr int64_t kFlushBlocks = 16;    // column sums go from float to double every 256 rows

typedef float Lanes __attribute__((vector_size(64)));

inline Lanes Load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(Lanes));
  return v;
}
inline void Store(float* p, Lanes v) { std::memcpy(p, &v, sizeof(Lanes)); }
inline Lanes Splat(float s) { return Lanes{} + s; }
inline Lanes Abs(Lanes v) { return v < 0 ? -v : v; }
inline Lanes Max(Lanes a, Lanes b) { return a > b ? a : b; }

typedef int32_t IntLanes __attribute__((vector_size(64)));

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

// Sum of the 16 lanes in a fixed tree.
inline double LaneSum(Lanes v) {
  float s8[8], s4[4];
  for (int l = 0; l < 8; ++l) s8[l] = v[l] + v[l + 8];
  for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
  return static_cast<double>((s4[0] + s4[2]) + (s4[1] + s4[3]));
}

// A reusable barrier for the threads that share one problem.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void Wait() {
    if (count_ == 1) return;
    const int generation = generation_.load(std::memory_order_acquire);
    if (waiting_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
      waiting_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    for (int spin = 0; generation_.load(std::memory_order_acquire) == generation; ++spin) {
      if (spin > 2000) std::this_thread::yield();
    }
  }

 private:
  const int count_;
  std::atomic<int> waiting_{0};
  std::atomic<int> generation_{0};
};

struct Settings {
  int64_t n, blocks, k, last_rows, num_iters;
  float count_b, count_o;
  bool two_groups;
  float weight_b, inv_eps, gap;
};

// One problem, shared by `team` threads that each own a contiguous range of row blocks.
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
  // Per thread: column sums of both groups, double-buffered by iteration parity
  // [2][team][2][K]; initial totals [team][2]; row and slot errors [team][2].
  std::vector<double> partial, totals;
  std::vector<float> errors;
  Barrier barrier;
  int team;

  Problem(const Settings& s, int team)
      : r_b(s.blocks * kLanes), r_o(s.blocks * kLanes), row_b(s.blocks * kLanes),
        row_o(s.blocks * kLanes), partial(2 * team * 2 * s.k), totals(2 * team),
        errors(2 * team), barrier(team), team(team) {}

  double* Partial(int parity, int member, int group, int64_t k) {
    return partial.data() + ((parity * team + member) * 2 + group) * k;
  }

  // Column sums of one group: the team's partials added in a fixed order.
  void SumPartials(int parity, int group, int64_t k, float* out) {
    for (int64_t j = 0; j < k; ++j) {
      double total = 0.0;
      for (int m = 0; m < team; ++m) total += Partial(parity, m, group, k)[j];
      out[j] = static_cast<float>(total);
    }
  }
};

// Column sums of one thread: float lanes per anchor, moved into double every kFlushBlocks.
class ColumnSums {
 public:
  explicit ColumnSums(int64_t k) : k_(k), lanes_b_(k), lanes_o_(k) {}
  void Start(double* out_b, double* out_o) {
    out_b_ = out_b;
    out_o_ = out_o;
    std::fill(out_b_, out_b_ + k_, 0.0);
    std::fill(out_o_, out_o_ + k_, 0.0);
    Clear();
  }
  Lanes& b(int64_t j) { return lanes_b_[j]; }
  Lanes& o(int64_t j) { return lanes_o_[j]; }
  // After each block: flush every kFlushBlocks blocks (and at the end, with last = true).
  void BlockDone(bool last) {
    if (++pending_ < kFlushBlocks && !last) return;
    for (int64_t j = 0; j < k_; ++j) {
      out_b_[j] += LaneSum(lanes_b_[j]);
      out_o_[j] += LaneSum(lanes_o_[j]);
    }
    Clear();
  }

 private:
  void Clear() {
    std::fill(lanes_b_.begin(), lanes_b_.end(), Lanes{});
    std::fill(lanes_o_.begin(), lanes_o_.end(), Lanes{});
    pending_ = 0;
  }
  int64_t k_, pending_ = 0;
  std::vector<Lanes> lanes_b_, lanes_o_;
  double *out_b_ = nullptr, *out_o_ = nullptr;
};

// Steps (b) and (c) on one block of 16 rows (sinkhorn._solve_linear's `iteration`), the block's
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

template <int KC>
void SolveRows(Problem& p, const Settings& s, int member) {
  const int64_t k = KC > 0 ? KC : s.k, block_size = k * kLanes;
  const int64_t begin = s.blocks * member / p.team, end = s.blocks * (member + 1) / p.team;
  float* x = p.x;
  float* kern = p.kernel;
  std::vector<float> col_b(k), col_o(k), u(k, 1.0f), alpha_b(k), u_next(k);
  std::vector<float> scaled(block_size);
  ColumnSums cols(k);

  // The exponentials, in the blocked layout, and their row sums.
  {
    double total_b = 0.0, total_o = 0.0;
    std::vector<float> tile(block_size);  // one block of scores, transposed to (K, 16)
    for (int64_t b = begin; b < end; ++b) {
      float* xb = x + b * block_size;
      float* kb = kern + b * block_size;
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
      total_b += LaneSum(sb);
      total_o += LaneSum(so);
    }
    p.totals[2 * member] = total_b;
    p.totals[2 * member + 1] = total_o;
    p.barrier.Wait();
    double sum_b = 0.0, sum_o = 0.0;
    for (int m = 0; m < p.team; ++m) {
      sum_b += p.totals[2 * m];
      sum_o += p.totals[2 * m + 1];
    }
    float r_b0, r_o0;
    if (s.two_groups) {
      const float total = s.count_b * static_cast<float>(sum_b) +
                          s.count_o * p.scale_o * static_cast<float>(sum_o);
      r_b0 = 1.0f / total;
      r_o0 = p.scale_o / total;
    } else {
      r_b0 = 1.0f / (s.count_b * static_cast<float>(sum_b));
      r_o0 = r_b0;
    }
    cols.Start(p.Partial(0, member, 0, k), p.Partial(0, member, 1, k));
    for (int64_t b = begin; b < end; ++b) {
      const float* xb = x + b * block_size;
      const float* kb = kern + b * block_size;
      const int64_t row0 = b * kLanes;
      Store(&p.r_b[row0], Splat(r_b0));
      Store(&p.r_o[row0], Splat(r_o0));
      Store(&p.row_b[row0], Load(&p.row_b[row0]) * r_b0);
      Store(&p.row_o[row0], s.two_groups ? Load(&p.row_o[row0]) * r_o0 : Load(&p.row_b[row0]));
      for (int64_t j = 0; j < k; ++j) {
        cols.b(j) += r_b0 * Load(xb + j * kLanes);
        if (s.two_groups) cols.o(j) += r_o0 * (Load(xb + j * kLanes) * Load(kb + j * kLanes));
      }
      cols.BlockDone(b + 1 == end);
    }
    p.barrier.Wait();
    p.SumPartials(0, 0, k, col_b.data());
    if (s.two_groups) p.SumPartials(0, 1, k, col_o.data());
    else col_o = col_b;
  }

  for (int64_t it = 0; it < s.num_iters; ++it) {
    const int parity = static_cast<int>((it + 1) & 1);
    for (int64_t j = 0; j < k; ++j) {
      alpha_b[j] = p.c[j] / (col_b[j] + kDamping);                                        // (a)
      u_next[j] = s.two_groups ? u[j] * ((col_b[j] + kDamping) / (col_o[j] + kDamping)) : u[j];
    }
    cols.Start(p.Partial(parity, member, 0, k), p.Partial(parity, member, 1, k));
    for (int64_t b = begin; b < end; ++b) {
      if (s.two_groups) {
        IterateBlock<KC, true>(x + b * block_size, kern + b * block_size, alpha_b.data(),
                               u_next.data(), scaled.data(), p, b * kLanes, s, cols);
      } else {
        IterateBlock<KC, false>(x + b * block_size, nullptr, alpha_b.data(), nullptr, nullptr, p,
                                b * kLanes, s, cols);
      }
      cols.BlockDone(b + 1 == end);
    }
    p.barrier.Wait();
    p.SumPartials(parity, 0, k, col_b.data());
    if (s.two_groups) {
      p.SumPartials(parity, 1, k, col_o.data());
      for (int64_t j = 0; j < k; ++j) col_o[j] = col_o[j] * u_next[j];
    } else {
      col_o = col_b;
    }
    u = u_next;
  }

  // Final renormalisation over anchors; marginal errors (rows and slots here, columns below).
  const int64_t first_target_row = s.n - s.last_rows;
  Lanes row_err = {}, slot_err = {};
  for (int64_t b = begin; b < end; ++b) {
    const float* xb = x + b * block_size;
    const float* kb = kern + b * block_size;
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
        const Lanes a_o = (xv * Load(kb + j * kLanes)) * (u[j] * ro);
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
  p.errors[2 * member] = row_max;
  p.errors[2 * member + 1] = slot_max;
  p.barrier.Wait();
  if (member == 0) {
    float err = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      err = std::max(err, std::fabs(col_b[j] - p.c[j]) / p.c[j]);
      err = std::max(err, std::fabs(col_o[j] - p.c[j]) / p.c[j]);
    }
    for (int m = 0; m < p.team; ++m) err = std::max(err, std::max(p.errors[2 * m], p.errors[2 * m + 1]));
    *p.error = err;
  }
}

ffi::Error MultiSKLinearImpl(ffi::Buffer<ffi::F32> scores, ffi::Buffer<ffi::F32> c,
                             ffi::Buffer<ffi::F32> shifts, float weight_b, float inv_eps, float gap,
                             float count_b, float count_o, int64_t num_iters, int64_t last_rows,
                             int64_t threads, ffi::ResultBuffer<ffi::F32> x,
                             ffi::ResultBuffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> target,
                             ffi::ResultBuffer<ffi::F32> error) {
  auto dims = scores.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("msk_multisk_linear: scores must be (..., N, K)");
  const int64_t n = dims[dims.size() - 2], k = dims[dims.size() - 1];
  const int64_t blocks = (n + kLanes - 1) / kLanes;
  if (n < 1 || k < 1 || last_rows < 1 || last_rows > n || num_iters < 0)
    return ffi::Error::InvalidArgument("msk_multisk_linear: invalid shape or settings");
  const int64_t problems = static_cast<int64_t>(scores.element_count()) / (n * k);
  const int64_t size = blocks * k * kLanes;
  if (static_cast<int64_t>(c.element_count()) != problems * k ||
      static_cast<int64_t>(shifts.element_count()) != problems * 3 ||
      static_cast<int64_t>(x->element_count()) != problems * size ||
      static_cast<int64_t>(kernel->element_count()) != problems * size)
    return ffi::Error::InvalidArgument("msk_multisk_linear: c, shifts or the outputs do not match the scores");
  const Settings s{n, blocks, k, last_rows, num_iters, count_b, count_o, count_o > 0.0f,
                   weight_b, inv_eps, gap};

  // Threads: one per problem while there are at least as many problems as threads; otherwise
  // the row blocks of each problem are split among a team (at least 16 blocks per thread).
  const int64_t max_threads = std::max<int64_t>(1, threads);
  const int64_t team = std::max<int64_t>(
      1, std::min<int64_t>(max_threads / std::max<int64_t>(1, problems), blocks / 16));
  const int64_t teams = std::max<int64_t>(1, std::min<int64_t>(problems, max_threads / team));
  // The paper's anchor count (64) gets a build with the anchor loop unrolled.
  void (*solve)(Problem&, const Settings&, int) = k == 64 ? SolveRows<64> : SolveRows<0>;

  auto run_team = [&](int64_t first_problem) {
    for (int64_t q = first_problem; q < problems; q += teams) {
      Problem p(s, static_cast<int>(team));
      p.scores = scores.typed_data() + q * n * k;
      p.x = x->typed_data() + q * size;
      p.kernel = kernel->typed_data() + q * size;
      p.c = c.typed_data() + q * k;
      p.top = shifts.typed_data()[3 * q];
      p.gap_top = shifts.typed_data()[3 * q + 1];
      p.scale_o = shifts.typed_data()[3 * q + 2];
      p.target = target->typed_data() + q * last_rows * k;
      p.error = error->typed_data() + q;
      std::vector<std::thread> members;
      for (int m = 1; m < team; ++m) members.emplace_back(solve, std::ref(p), std::cref(s), m);
      solve(p, s, 0);
      for (auto& t : members) t.join();
    }
  };
  std::vector<std::thread> workers;
  for (int64_t t = 1; t < teams; ++t) workers.emplace_back(run_team, t);
  run_team(0);
  for (auto& t : workers) t.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MskMultiSKLinear, MultiSKLinearImpl,
                              ffi::Ffi::Bind()
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
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
