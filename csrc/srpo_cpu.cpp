// Fused row passes of the SRPO loss for the CPU (see srpo_kernels/backends/row_ops.py for the contract).
//
// Each row of a [C, V] fp32 chunk of logits is reduced (max, sum-exp, entropy, divergence) in a few passes that
// stay in L2, and the gradient pass overwrites the row with dL/dlogits. Rows run in parallel on torch's OpenMP
// pool; the inner loops are `omp simd` with a branch-free exp/log so they vectorise.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace {

// The math helpers must inline into the simd loops, or the loops stay scalar.
#define ALWAYS_INLINE inline __attribute__((always_inline))

constexpr float kLogTiny = -87.33654475f;  // log(FLT_MIN): floor of a tail bucket's log-probability
// Column layout shared with row_ops.py. Each stats tensor carries private columns after the named ones: the row's
// argmax (exact as a float below 2^24), found in the stats pass so the gradient pass need not search again, then
// the student's log s (student stats), or the private distill columns below.
enum Col { LSE = 0, LOGP, ENTROPY, T_LSE, T_ENTROPY, DIVERGENCE, AUX_KL, P_NORM, Q_NORM, T_ENTROPY_LO, N_DISTILL };
constexpr int64_t kStudentTop = ENTROPY + 1, kStudentLogS = kStudentTop + 1, kStudentCols = kStudentLogS + 1;
// Private distill columns: the student's argmax, its log s, the (max, log s) pairs of the top-K
// support's log-probs on each side (log p = (x - max) - log s: the whole row's with a tail bucket, the K entries'
// without), the support's shift (Divergence::value), its tail bucket's log q - log p (tail_delta) and its lse_gap
// (log q - log p = (y - x) + gap, the gap from the log-sums in double: an fp32 log s rounds at its own size), then
// the normaliser (m_t, log s_t) of the student's tail members' p_j / p_tail = exp((x_j - m_t) - log s_t): the tail's
// own max and log-sum where tail_logprob finds them (x_j - m would round at |x_j - m|: 2e-5 relative for a tail 200
// below the max that holds the teacher's mass), else (m, log s + log p_tail).
constexpr int64_t kDistillTop = N_DISTILL, kDistillLogS = kDistillTop + 1,
                  kSupportMaxZ = kDistillLogS + 1, kSupportLogSZ = kSupportMaxZ + 1, kSupportMaxU = kSupportLogSZ + 1,
                  kSupportLogSU = kSupportMaxU + 1, kSupportShift = kSupportLogSU + 1,
                  kSupportTailDelta = kSupportShift + 1, kSupportGap = kSupportTailDelta + 1,
                  kTailMax = kSupportGap + 1, kTailLogS = kTailMax + 1, kDistillCols = kTailLogS + 1;
constexpr int64_t kMaxVocab = int64_t(1) << 24;

ALWAYS_INLINE float as_float(int32_t i) { float f; std::memcpy(&f, &i, 4); return f; }
ALWAYS_INLINE int32_t as_int(float f) { int32_t i; std::memcpy(&i, &f, 4); return i; }

// exp(x), ~1 ulp; 0 below log(FLT_MIN) (so -inf gives 0), NaN for NaN. Cephes polynomial after range reduction by
// ln 2. Adding 1.5 * 2^23 rounds x / ln 2 to an integer k and leaves k in the sum's low mantissa bits, so 2^k needs
// no float-to-int conversion; with std::min/max for the clamp the log-sum-exp loop is 36 instructions, not 44, for
// the same bits (every float in [-200, 100] checked): 26.2 -> 21.4 us a row of 32 000 exps (Sapphire Rapids).
ALWAYS_INLINE float vexp(float x) {
  const float lo = -87.33654475f, hi = 88.37626266f;
  const float xc = std::min(std::max(x, lo), hi);
  const float shifted = std::fma(xc, 1.44269504088896341f, 12582912.0f);
  const float k = shifted - 12582912.0f;
  float r = std::fma(k, -0.693359375f, xc);
  r = std::fma(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  const float scale = as_float((as_int(shifted) - (as_int(12582912.0f) - 127)) << 23);
  return x < lo ? 0.0f : p * scale;
}

// log(1 + t) for t in [0, 1], as t + t^2 r(t) with r a degree-9 polynomial: the Chebyshev least-squares fit of
// (log1p(t) - t) / t^2 on [0, 1] (scripts/fit_log1p.py prints the coefficients), in powers of t.
// 1.31 ulp at most over every float in [0, 1], mean 0.05 (a Cephes logf of 1 + t with the rounding of 1 + t
// corrected: 1.34 and 0.07); half the instructions of that log, no exponent extraction, and the JSD loop of the
// distill stats pass measured 62 -> 41 us a row at V = 32 000 (Sapphire Rapids, one thread).
ALWAYS_INLINE float log1p_unit(float t) {
  float q = 2.835782537e-03f;
  q = std::fma(q, t, -1.728062871e-02f);
  q = std::fma(q, t, 4.936718307e-02f);
  q = std::fma(q, t, -9.130396317e-02f);
  q = std::fma(q, t, 1.301727139e-01f);
  q = std::fma(q, t, -1.635469798e-01f);
  q = std::fma(q, t, 1.995332235e-01f);
  q = std::fma(q, t, -2.499621546e-01f);
  q = std::fma(q, t, 3.333320005e-01f);
  q = std::fma(q, t, -4.999999884e-01f);
  return std::fma(q * t, t, t);
}

// JSD terms d = log(p / m), e = log(q / m), m = (1-a) p + a q, from delta = log q - log p (see support.jsd_terms):
// with s = delta + log(a / (1-a)), d = -(delta + log a + log1p(e^-s)) where s > 0, else -(log(1-a) + log1p(e^s)).
// Neither loses digits where p and q are far apart, which is where the gradient (1-a) p (d - sum p d) of sharp,
// disagreeing distributions lives, and delta never passes through s, whose log(a / (1-a)) would round away the digits
// of a delta near 0 (where that gradient is a difference of nearly equal d's). exp(-|s|) is taken as the ratio of the
// smaller to the larger of (1-a) p and a q: p and q are on hand, and a division is cheaper than an exp. Not for |s|
// below 1/4: there log1p(e^-|s|) comes from its series in |s| (to |s|^6: 7e-10 relative at 1/4). The ratio carries
// the row's rounding of its log-sums with the sign of s, a tilt that entries on both sides of s = 0 turn into an error
// of their nearly equal d's (flat rows at a = 0.5, V = 3000: dh 5.7e-3 from fp64, 2e-5 with this, naive 1e-3).
// c0 = -log(1-a), c1 = -log(a).
ALWAYS_INLINE void jsd_terms(float delta, float p, float q, float log_beta, float one_minus_a, float a, float c0,
                             float c1, float& d, float& e) {
  const float s = delta + log_beta, wp = one_minus_a * p, wq = a * q;
  const float lo = wp < wq ? wp : wq, hi = wp < wq ? wq : wp;
  const float x = std::fabs(s), x2 = x * x;
  const float series = std::fma(x2, std::fma(x2, std::fma(x2, 1.f / 2880.f, -1.f / 192.f), 0.125f),
                                std::fma(x, -0.5f, 0.69314718f));
  const float soft = x < 0.25f ? series : log1p_unit(hi > 0.f ? lo / hi : 0.f);
  const bool pos = s > 0.f;
  d = pos ? -(delta + (soft - c1)) : c0 - soft;
  e = pos ? c1 - soft : delta + (c0 - soft);
}

// y - x as s + e exactly: s = fl(y - x) and e its rounding error (Knuth's TwoSum, which needs no FMA and no
// reassociation: none of the flags allows either). 0 for e where s is not finite (-inf logits), whose error is NaN.
ALWAYS_INLINE void exact_diff(float y, float x, float& s, float& e) {
  s = y - x;
  const float yv = s + x, xv = s - yv, err = (y - yv) - (x + xv);
  e = err == err ? err : 0.f;
}

// log q - log p of a full-vocabulary entry, (y - x) + (lse_z - lse_u), rounded once: y - x kept exactly (exact_diff)
// and the row's gap as the pair gap_hi + gap_lo. The plain (y - x) + gap rounds at |y - x| and |gap|, exact where
// the rows nearly agree but not where one side's logits are far larger than the other's (a teacher 300x as sharp:
// dh 2e-5 from fp64 against the naive 6e-7); log-probs' own difference lq - lp is the reverse.
ALWAYS_INLINE float log_ratio(float y, float x, float gap_hi, float gap_lo, float& dif, float& err) {
  exact_diff(y, x, dif, err);
  return (dif + gap_hi) + (err + gap_lo);
}

// dL/dz sums to zero over a row (shift invariance). Where a few tokens hold most of the probability their entries are
// differences of nearly equal terms (e.g. p (log p - log m - KL)) that lose their digits in fp32; the other, light
// entries carry no such cancellation. So each heavy entry j (p_j >= 1/16) is moved by p_j / (heavy mass) of the row's
// sum, the heavy entries' own sum taken first (one heavy entry: minus the sum of the others, exactly): the projection
// autograd's log-softmax backward applies, on the entries where it matters (twin top logits need it shared). Only
// where the heavy entries hold more than half the mass: on a flat row that sum of V similar terms is the less
// accurate of the two (14x the naive dW error measured at V = 673). support.rebalance_ is the same rule.
constexpr int kMaxHeavy = 16;  // 1 / the heavy share: no more entries can hold it
constexpr float kHeavyShare = 1.f / kMaxHeavy, kLogHeavyShare = -2.7725887f;  // log(1/16)
struct Heavy {
  int n = 0;  // 0: the row is not rebalanced
  int64_t id[kMaxHeavy];  // ascending
  float share[kMaxHeavy];  // p_j / (the heavy entries' mass)
};

// A row's heavy entries, from its logits (before the gradient overwrites them), max x[top] and log s.
inline Heavy heavy_entries(const float* x, int64_t n, int64_t top, float log_s) {
  Heavy h;
  const float m = x[top], p_top = std::exp(-log_s);
  if (!(p_top * kMaxHeavy > 0.5f)) return h;  // 16 entries of at most p_top each hold at most half
  float p[kMaxHeavy], mass = 0.f;
  auto add = [&](int64_t j) {
    const float pj = std::exp((x[j] - m) - log_s);
    if (pj >= kHeavyShare && h.n < kMaxHeavy) { h.id[h.n] = j; p[h.n++] = pj; mass += pj; }
  };
  if (p_top > 1.f - kHeavyShare) {
    add(top);  // no other entry can be heavy
  } else {
    const float at_least = m + log_s + kLogHeavyShare - 1e-3f;  // a cheap screen; add() decides
    constexpr int64_t kBlock = 16;
    int64_t j = 0;
    for (; j + kBlock <= n; j += kBlock) {
      int any = 0;
#pragma omp simd reduction(| : any)
      for (int64_t l = 0; l < kBlock; ++l) any |= x[j + l] >= at_least;
      if (any)
        for (int64_t l = 0; l < kBlock; ++l)
          if (x[j + l] >= at_least) add(j + l);
    }
    for (; j < n; ++j)
      if (x[j] >= at_least) add(j);
  }
  if (!(mass > 0.5f)) {
    h.n = 0;
    return h;
  }
  for (int k = 0; k < h.n; ++k) h.share[k] = p[k] / mass;
  return h;
}

// The row's gradient `x` rebalanced (see above) from its own heavy entries and the light entries' sum.
inline void set_heavy(float* x, const Heavy& h, const float* own, float light) {
  float heavy_sum = 0.f;
  for (int k = 0; k < h.n; ++k) heavy_sum += own[k];
  for (int k = 0; k < h.n; ++k) x[h.id[k]] = (own[k] - h.share[k] * heavy_sum) - h.share[k] * light;
}

inline void rebalance(float* x, int64_t n, const Heavy& h) {
  if (h.n == 0) return;
  float own[kMaxHeavy];
  for (int k = 0; k < h.n; ++k) {
    own[k] = x[h.id[k]];
    x[h.id[k]] = 0.f;
  }
  float light = 0.f;
#pragma omp simd reduction(+ : light)
  for (int64_t j = 0; j < n; ++j) light += x[j];
  set_heavy(x, h, own, light);
}

// First index of the row's maximum, in one vectorised pass: each of kLanes lanes keeps its running max and where it
// was seen (strict > keeps the first), then the lanes are merged.
constexpr int kLanes = 16;
inline int64_t row_argmax(const float* x, int64_t n) {
  float m[kLanes];
  int32_t at[kLanes];
  for (int l = 0; l < kLanes; ++l) { m[l] = -std::numeric_limits<float>::infinity(); at[l] = 0; }
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const bool gt = x[j + l] > m[l];
      m[l] = gt ? x[j + l] : m[l];
      at[l] = gt ? static_cast<int32_t>(j + l) : at[l];
    }
  }
  float best = -std::numeric_limits<float>::infinity();
  int64_t top = 0;
  for (int l = 0; l < kLanes; ++l)
    if (m[l] > best || (m[l] == best && at[l] < top)) { best = m[l]; top = at[l]; }
  for (; j < n; ++j)
    if (x[j] > best) { best = x[j]; top = j; }
  return top;
}

// Shifted sums over [b, e): r += e^{x-m}, t += e^{x-m} (x-m); with `keep`, e^{x-m} is stored there. Each block of
// kSumBlock entries is summed in fp32 lanes, the blocks in double: one fp32 sum over a row of 151 936 has 9,500
// terms per lane and a relative error near 1e-6 (the entropy's at V = 151 936 was 20x the torch backend's, whose
// sums cascade), while a block's is that of 32 terms a lane.
constexpr int64_t kSumBlock = 512;
template <bool kKeep>
ALWAYS_INLINE void shifted_sums(const float* __restrict x, int64_t b, int64_t e, float m, double& r, double& t,
                                float* __restrict keep) {
  for (int64_t b0 = b; b0 < e; b0 += kSumBlock) {
    const int64_t e0 = std::min(e, b0 + kSumBlock);
    float rb = 0.f, tb = 0.f;
#pragma omp simd reduction(+ : rb, tb)
    for (int64_t j = b0; j < e0; ++j) {
      float d = x[j] - m, ex = vexp(d);
      if (kKeep) keep[j] = ex;
      rb += ex;
      tb += ex > 0.f ? ex * d : 0.f;  // -inf logits: 0, not 0 * -inf
    }
    r += rb;
    t += tb;
  }
}

// lse and entropy of softmax(x) given the row's argmax `top`, from shifted sums s = 1 + r, r = sum_{j != top}
// e^{x-m}, t = sum e^{x-m} (x-m) (no cancellation; log s = log1p(r): on a sharp row fp32 cannot hold 1 + r), the
// last steps in double (an fp32 log s and H would each round at their own size first; the teacher's entropy keeps
// its double, row_ops.T_ENTROPY_LO). With `keep`, e^{x-m} is stored there for a later pass.
struct RowNorm {
  float lse, log_s, entropy, s;
  double log_s_wide, entropy_wide;
};
inline RowNorm row_lse_entropy(const float* __restrict x, int64_t n, int64_t top, float* __restrict keep = nullptr) {
  const float m = x[top];
  double r = 0, t = 0;
  if (keep) {  // two instantiations: with the test inside the loop the distill stats pass measured ~8% slower
    shifted_sums<true>(x, 0, top, m, r, t, keep);
    shifted_sums<true>(x, top + 1, n, m, r, t, keep);
    keep[top] = 1.f;
  } else {
    shifted_sums<false>(x, 0, top, m, r, t, keep);
    shifted_sums<false>(x, top + 1, n, m, r, t, keep);
  }
  RowNorm out;
  out.log_s_wide = std::log1p(r);
  out.entropy_wide = std::max(out.log_s_wide - t / (1 + r), 0.0);  // >= 0: a near-certain row must not go below
  out.log_s = static_cast<float>(out.log_s_wide);
  out.entropy = static_cast<float>(out.entropy_wide);
  out.lse = m + out.log_s;
  out.s = static_cast<float>(1 + r);
  return out;
}

// The teacher entropy as its fp32 rounding and the remainder (row_ops.set_teacher_entropy).
inline void set_teacher_entropy(float* s, double h) {
  s[T_ENTROPY] = static_cast<float>(h);
  s[T_ENTROPY_LO] = static_cast<float>(h - static_cast<double>(s[T_ENTROPY]));
}

// The log-probability of the tail bucket (support.tail_logprob), in double, 0 for an empty tail (the caller floors it
// at kLogTiny). Where the tail holds most of the mass, log1p(-the support's mass `support`, from its log-probs):
// the shifted form below rounds at |log s| there (1e-7 on a flat row of 168, 10x the naive error, which an entropy
// weight exp(-beta H_T) multiplies by beta). Elsewhere the row's log-sum-exp with `ids` excluded, minus its own,
// both in the shifted form of row_lse_entropy ((x_t - m) + log1p(r_t) - log s, t the tail's argmax): 1 - sum would
// cancel, and x - lse would round at |lse| (a tail holding all but e^-100 of the mass came out 1e-5 away from 0).
// `empty` is set for a tail with no finite entry; (m_t, log_s_t) to the tail's own max and log-sum where they are
// found, else to (m, log s + the result) (the same p_j / p_tail).
constexpr double kTailFromSupport = 0.5;
inline double tail_logprob(float* x, int64_t n, const int64_t* ids, int64_t k, float m, double log_s, double support,
                           bool& empty, float& m_t, float& log_s_t) {
  empty = false;
  m_t = m;
  if (support < kTailFromSupport) {
    const double out = std::log1p(-support);
    log_s_t = static_cast<float>(log_s + out);
    return out;
  }
  std::vector<float> saved(k);
  for (int64_t i = 0; i < k; ++i) { saved[i] = x[ids[i]]; x[ids[i]] = -std::numeric_limits<float>::infinity(); }
  const int64_t t = row_argmax(x, n);
  double out = 0;
  empty = !(x[t] > -std::numeric_limits<float>::infinity());
  log_s_t = static_cast<float>(log_s);
  if (!empty) {
    const double own = row_lse_entropy(x, n, t).log_s_wide;
    out = (static_cast<double>(x[t]) - m) + own - log_s;
    m_t = x[t];
    log_s_t = static_cast<float>(own);
  }
  for (int64_t i = 0; i < k; ++i) x[ids[i]] = saved[i];
  return out;
}

// Indices of the k largest entries (partial selection with a min-heap; most entries fail one comparison).
void topk_ids(const float* x, int64_t n, int64_t k, int64_t* out) {
  std::vector<std::pair<float, int64_t>> heap;
  heap.reserve(k);
  auto cmp = std::greater<std::pair<float, int64_t>>();
  for (int64_t j = 0; j < n; ++j) {
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.emplace_back(x[j], -j);  // -j: among equal values the lower index wins, as in torch.topk
      std::push_heap(heap.begin(), heap.end(), cmp);
    } else if (x[j] > heap.front().first) {
      std::pop_heap(heap.begin(), heap.end(), cmp);
      heap.back() = {x[j], -j};
      std::push_heap(heap.begin(), heap.end(), cmp);
    }
  }
  for (int64_t i = 0; i < k; ++i) out[i] = -heap[i].second;
}

inline float plogdiff(float p, float a, float b) { return p > 0.f ? p * (a - b) : 0.f; }

// p phi(g), phi(g) = g + exp(-g) - 1 >= 0, for g = log p - log q, given pe = p exp(-g) = q: KL(p||q) = sum p phi(g),
// a sum of non-negative terms that keeps its digits where p and q nearly agree (see support.phi_terms). The series
// (to g^7) below |g| = 0.25, else the direct form p g + (pe - p); where p = 0 the term's limit, pe.
ALWAYS_INLINE float phi_term(float p, float g, float pe) {
  const float ag = g < 0.f ? -g : g;
  const bool small = ag < 0.25f;
  const float gs = small ? g : 0.f;
  float poly = -1.9841270e-4f;  // (-1)^k / k!, k = 7 down to 2
  poly = std::fma(poly, gs, 1.3888889e-3f);
  poly = std::fma(poly, gs, -8.3333333e-3f);
  poly = std::fma(poly, gs, 4.1666667e-2f);
  poly = std::fma(poly, gs, -1.6666667e-1f);
  poly = std::fma(poly, gs, 0.5f);
  const float term = small ? p * gs * gs * poly : p * g + (pe - p);
  return p > 0.f ? term : pe;
}

// The mode (0 forward KL, 1 reverse KL, 2 JSD) and 1 - alpha are taken from the double: alpha = 1 - 1e-8 is a JSD
// with weight 1e-8 on KL(p||m), while static_cast<float>(alpha) would round it to reverse KL.
struct Divergence {
  int mode;
  float alpha, om, log_beta, c0, c1;  // om = 1 - a; log(a / (1-a)), -log(1-a), -log(a)
  explicit Divergence(double a) : mode(a == 0.0 ? 0 : (a == 1.0 ? 1 : 2)), alpha(static_cast<float>(a)),
      om(static_cast<float>(1.0 - a)),
      log_beta(a > 0.0 && a < 1.0 ? static_cast<float>(std::log(a / (1 - a))) : 0.f),
      c0(a < 1.0 ? static_cast<float>(-std::log1p(-a)) : 0.f), c1(a > 0.0 ? static_cast<float>(-std::log(a)) : 0.f) {}

  // The gradient's per-entry term (g = lp - lq for reverse KL, the JSD's d; none for forward KL) of one entry, from
  // its log-probs and delta = lq - lp.
  float term(float lp, float lq, float delta) const {
    if (mode == 1) return -delta;
    if (mode == 0) return 0.f;
    float dj, ej;
    jsd_terms(delta, std::exp(lp), std::exp(lq), log_beta, om, alpha, c0, c1, dj, ej);
    return dj;
  }

  // D and the sum its gradient needs, over `n` support entries given as log-probs (scalar: top-K buckets) and
  // delta = lq - lp from the logits' own difference (exact where the rows nearly agree, as support.bucket_logprobs
  // takes it): sum p (term - shift), `shift` the term at p's most probable entry (support.divergence_and_aux).
  void value(const float* lp, const float* lq, const float* delta, int64_t n, float& d, float& aux,
             float& shift) const {
    double s1 = 0, s2 = 0, s3 = 0;
    int64_t top = 0;
    for (int64_t j = 1; j < n; ++j)
      if (lp[j] > lp[top]) top = j;
    shift = term(lp[top], lq[top], delta[top]);
    for (int64_t j = 0; j < n; ++j) {
      float p = std::exp(lp[j]), q = std::exp(lq[j]);
      if (mode == 0) {  // KL(q||p) = sum q phi(log q - log p)
        s1 += phi_term(q, delta[j], p);
      } else if (mode == 1) {
        const float g = -delta[j];
        s1 += phi_term(p, g, q);
        s3 += plogdiff(p, g, shift);
      } else {
        float dj, ej;
        jsd_terms(delta[j], p, q, log_beta, om, alpha, c0, c1, dj, ej);
        const float m = om * p + alpha * q;  // KL(p||m) = sum p phi(d), KL(q||m) = sum q phi(e)
        s1 += phi_term(p, dj, m);
        s2 += phi_term(q, ej, m);
        s3 += plogdiff(p, dj, shift);
      }
    }
    if (mode == 0) { d = s1; aux = 0.f; }
    else if (mode == 1) { d = s1; aux = s3; }
    else { d = om * s1 + alpha * s2; aux = s3; }
  }

  // dD/d(logit) of one support entry (delta and `shift` as value() took them). Forward KL's p - q as
  // -p expm1(delta) where |delta| < 1: the difference of two rounded probabilities keeps only the digits of a small
  // delta (far apart, p expm1(delta) could overflow where p is tiny and q is not).
  float grad(float lp, float lq, float delta, float aux, float shift) const {
    float p = std::exp(lp);
    if (mode == 0) return std::abs(delta) < 1.f ? -p * std::expm1(delta) : p - std::exp(lq);
    if (mode == 1) return plogdiff(p, -delta - shift, aux);
    float dj, ej;
    jsd_terms(delta, p, std::exp(lq), log_beta, om, alpha, c0, c1, dj, ej);
    return om * plogdiff(p, dj - shift, aux);
  }
};

// Full-vocabulary distillation gradient of one row: x <- c dD/dz - a p (the target's +a is added by the caller).
// `y` is the teacher row as distill_row_stats left it: q for alpha = 0, else the per-entry term g with
// dD/dz = c' p (g - aux), g taken relative to its value at the row's argmax: z - u for alpha = 1 (log p - log q up
// to a per-row constant), the JSD term d otherwise. p = exp((x - m) - log s), as in the stats pass: exp(x - lse)
// would round each log-prob at |lse|.
void full_vocab_grad(float* __restrict x, const float* __restrict y, int64_t n, float m, float log_s, float aux,
                     float a, float c, const Divergence& div) {
  if (div.mode == 0) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float p = vexp((x[j] - m) - log_s);
      x[j] = c * (p - y[j]) - a * p;
    }
    return;
  }
  const float c1 = div.mode == 1 ? c : c * div.om;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float p = vexp((x[j] - m) - log_s);
    x[j] = c1 * p * (y[j] - aux) - a * p;
  }
}

// Top-K row, every entry treated as a tail member first: x <- g_tail p_j / p_tail - a p_j, with p_j as in
// full_vocab_grad and p_j / p_tail = exp((x - m_t) - log s_t), (m_t, log s_t) the tail's normaliser (kTailMax).
void tail_grad(float* __restrict x, int64_t n, float m, float log_s, float g_tail, float m_t, float log_s_t,
               float a) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = g_tail * vexp((x[j] - m_t) - log_s_t) - a * vexp((x[j] - m) - log_s);
}

double entropy_of(const double* lq, int64_t n) {
  double h = 0;
  for (int64_t j = 0; j < n; ++j) { double q = std::exp(lq[j]); if (q > 0) h -= q * lq[j]; }
  return std::max(h, 0.0);  // a rounded log-prob just above 0 must not give H < 0
}

// delta = lq - lp of one support entry, and its error in units of eps (support.support_deltas): from the logits'
// own difference (y - x) + gap where that is the more accurate, else the difference of the log-probs.
ALWAYS_INLINE float support_delta(float x, float y, float lp, float lq, float gap, float& err) {
  const float diff = y - x, from_logits = std::abs(diff) + std::abs(gap), from_logp = std::abs(lp) + std::abs(lq);
  const bool use = from_logits < from_logp;
  err = use ? from_logits : from_logp;
  return use ? diff + gap : lq - lp;
}

// log q_tail - log p_tail from the support's K log-probs, deltas and their errors, the tail last in lp, lq
// (support.tail_delta): log1p(A / p_tail) with A = -sum p_k expm1(delta_k), exact where the rows nearly agree,
// unless the difference of the tail log-probs is the more accurate (a tail of almost nothing, large logits).
float tail_delta(const float* lp, const float* lq, const float* dl, const float* de, int64_t K) {
  double a = 0, err = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (!(lp[k] > -std::numeric_limits<float>::infinity())) continue;
    const double p = std::exp(static_cast<double>(lp[k])), em1 = std::expm1(static_cast<double>(dl[k]));
    a -= p * em1;
    err += p * (std::abs(em1) + (1 + em1) * de[k]);
  }
  const double p_tail = std::exp(static_cast<double>(lp[K])), ratio = a / p_tail;
  const bool better = err < p_tail * (std::abs(lq[K]) + std::abs(lp[K])) && ratio > -0.5;
  return better ? static_cast<float>(std::log1p(ratio)) : lq[K] - lp[K];
}

// Student and teacher statistics of one row, and the divergence over the support (full vocab or top-K). `ez`, `eu`
// are scratch rows: the exps of the lse pass are kept there for the full-vocabulary divergence. Over the full
// vocabulary the teacher row `y` is then overwritten with what the gradient pass needs of it (see row_ops.py), which
// spares that pass an exp and a log per entry. Scratch of K + 1 entries: `lp`, `lq` the support's log-probs, `dl`
// their difference lq - lp and `de` its error (support_delta), `lqd` the teacher's log-probs in double, for its
// entropy.
void distill_row_stats(float* __restrict x, float* __restrict y, int64_t V, int64_t target, int64_t K, bool tail,
                       const Divergence& div, int64_t* row_ids, float* s, float* lp, float* lq, float* dl,
                       float* de, double* lqd, float* ez, float* eu) {
  const int64_t top = row_argmax(x, V);
  const bool full = K == 0;
  // log-sums of the shifted exps: log-probs are (x - max) - log s, rounded like log_softmax
  const RowNorm nz = row_lse_entropy(x, V, top, full ? ez : nullptr);
  const int64_t top_u = row_argmax(y, V);
  const float max_u = y[top_u];
  const RowNorm nu = row_lse_entropy(y, V, top_u, full ? eu : nullptr);
  const float lsz = nz.log_s, lsu = nu.log_s, sum_z = nz.s, sum_u = nu.s;
  s[LSE] = nz.lse; s[LOGP] = (x[target] - x[top]) - lsz; s[ENTROPY] = nz.entropy; s[T_LSE] = nu.lse;
  s[kDistillTop] = static_cast<float>(top);
  s[kDistillLogS] = lsz;
  if (full) {
    float d1 = 0.f, d2 = 0.f, d3 = 0.f;
    const float a = div.alpha, lb = div.log_beta, c0 = div.c0, c1 = div.c1, inv_z = 1.f / sum_z,
                inv_u = 1.f / sum_u;
    const float mz = x[top], mu = max_u;
    // Entries with zero probability contribute 0 (their logs may be -inf, e.g. a -inf bias masking the vocab).
    // log q - log p from log_ratio, the gap lse_z - lse_u as a pair from double (mz - mu exact there, the log-sums
    // unrounded: an fp32 log s rounds at its own size, which every delta of near-agreeing rows would carry).
    const double gap = (static_cast<double>(mz) - mu) + (nz.log_s_wide - nu.log_s_wide);
    const float gap_hi = static_cast<float>(gap), gap_lo = static_cast<float>(gap - gap_hi);
    float dif, err;  // y - x as dif + err (exact_diff), per entry
    if (div.mode == 0) {  // KL(q||p) = sum q phi(log q - log p)
#pragma omp simd reduction(+ : d1) private(dif, err)
      for (int64_t j = 0; j < V; ++j) {
        float q = eu[j] * inv_u;
        d1 += phi_term(q, log_ratio(y[j], x[j], gap_hi, gap_lo, dif, err), ez[j] * inv_z);
        y[j] = q;
      }
    } else if (div.mode == 1) {
      // KL = sum p phi(g), g = -log_ratio; the gradient takes t = (x - y) - shift, x - y exact as -(dif + err),
      // and sum p t, shift the row argmax's x - y (see support.full_vocab_shift: it keeps the digits of twins tied
      // at the top).
      const float shift = x[top] - y[top];
#pragma omp simd reduction(+ : d1, d3) private(dif, err)
      for (int64_t j = 0; j < V; ++j) {
        const float p = ez[j] * inv_z, g = -log_ratio(y[j], x[j], gap_hi, gap_lo, dif, err);
        const float t = p > 0.f ? (-dif - shift) - err : 0.f;
        d1 += phi_term(p, p > 0.f ? g : 0.f, eu[j] * inv_u);
        d3 += p * t;
        y[j] = t;
      }
    } else {
      const float one_minus_a = div.om;
      float shift, unused;  // the gradient's d at the row's argmax (support.full_vocab_shift)
      jsd_terms(log_ratio(y[top], x[top], gap_hi, gap_lo, dif, err), ez[top] * inv_z, eu[top] * inv_u, lb,
                one_minus_a, a, c0, c1, shift, unused);
#pragma omp simd reduction(+ : d1, d2, d3) private(dif, err)
      for (int64_t j = 0; j < V; ++j) {
        float p = ez[j] * inv_z, q = eu[j] * inv_u, dj, ej;
        jsd_terms(log_ratio(y[j], x[j], gap_hi, gap_lo, dif, err), p, q, lb, one_minus_a, a, c0, c1, dj, ej);
        const float m = one_minus_a * p + a * q;  // KL(p||m) = sum p phi(d), KL(q||m) = sum q phi(e)
        d1 += phi_term(p, dj, m);
        d2 += phi_term(q, ej, m);
        dj = p > 0.f ? dj - shift : 0.f;
        y[j] = dj;
        d3 += p * dj;  // the gradient's sum p (d - shift)
      }
    }
    set_teacher_entropy(s, nu.entropy_wide);
    s[DIVERGENCE] = div.mode != 2 ? d1 : div.om * d1 + a * d2;
    s[AUX_KL] = div.mode == 0 ? 0.f : d3;
    return;
  }
  topk_ids(x, V, K, row_ids);
  int64_t n = K;
  if (tail) {
    s[kSupportMaxZ] = x[top];
    s[kSupportLogSZ] = lsz;
    s[kSupportMaxU] = max_u;
    s[kSupportLogSU] = lsu;
    double mass_z = 0, mass_u = 0;  // the support's mass: double, as K may be large
    for (int64_t k = 0; k < K; ++k) {
      lp[k] = (x[row_ids[k]] - x[top]) - lsz;
      lq[k] = (y[row_ids[k]] - max_u) - lsu;
      lqd[k] = (static_cast<double>(y[row_ids[k]]) - max_u) - nu.log_s_wide;
      mass_z += std::exp((static_cast<double>(x[row_ids[k]]) - x[top]) - nz.log_s_wide);
      mass_u += std::exp(lqd[k]);
    }
    bool empty_z, empty_u;
    float tail_m_u, tail_ls_u;  // unused: the teacher's tail has no gradient
    const double tail_z = tail_logprob(x, V, row_ids, K, x[top], nz.log_s_wide, mass_z, empty_z, s[kTailMax],
                                       s[kTailLogS]);
    const double tail_u = tail_logprob(y, V, row_ids, K, max_u, nu.log_s_wide, mass_u, empty_u, tail_m_u, tail_ls_u);
    s[P_NORM] = lp[K] = empty_z ? kLogTiny : static_cast<float>(std::max<double>(tail_z, kLogTiny));
    lqd[K] = empty_u ? kLogTiny : std::max<double>(tail_u, kLogTiny);
    s[Q_NORM] = lq[K] = static_cast<float>(lqd[K]);
    const float gap = s[kSupportGap] = (x[top] - max_u) + static_cast<float>(nz.log_s_wide - nu.log_s_wide);
    for (int64_t k = 0; k < K; ++k) dl[k] = support_delta(x[row_ids[k]], y[row_ids[k]], lp[k], lq[k], gap, de[k]);
    s[kSupportTailDelta] = dl[K] = tail_delta(lp, lq, dl, de, K);
    n = K + 1;
  } else {
    float mz = -INFINITY, mu = -INFINITY;
    double sz = 0, su = 0;
    for (int64_t k = 0; k < K; ++k) { mz = std::max(mz, x[row_ids[k]]); mu = std::max(mu, y[row_ids[k]]); }
    for (int64_t k = 0; k < K; ++k) {
      sz += std::exp(static_cast<double>(x[row_ids[k]]) - mz);
      su += std::exp(static_cast<double>(y[row_ids[k]]) - mu);
    }
    const double lsz_wide = std::log(sz), lsu_wide = std::log(su);
    const float lsz = static_cast<float>(lsz_wide), lsu = static_cast<float>(lsu_wide);
    const float gap = s[kSupportGap] = (mz - mu) + static_cast<float>(lsz_wide - lsu_wide);
    s[P_NORM] = mz + lsz;
    s[Q_NORM] = mu + lsu;
    s[kSupportMaxZ] = mz;
    s[kSupportLogSZ] = lsz;
    s[kSupportMaxU] = mu;
    s[kSupportLogSU] = lsu;
    for (int64_t k = 0; k < K; ++k) {
      lp[k] = (x[row_ids[k]] - mz) - lsz;
      lq[k] = (y[row_ids[k]] - mu) - lsu;
      lqd[k] = (static_cast<double>(y[row_ids[k]]) - mu) - lsu_wide;
      dl[k] = support_delta(x[row_ids[k]], y[row_ids[k]], lp[k], lq[k], gap, de[k]);
    }
  }
  set_teacher_entropy(s, entropy_of(lqd, n));
  div.value(lp, lq, dl, n, s[DIVERGENCE], s[AUX_KL], s[kSupportShift]);
}

// x <- c_logp (onehot(y) - p) + c_div dD/dx for one row.
void distill_row_grad(float* __restrict x, const float* __restrict y, int64_t V, int64_t target, int64_t K,
                               bool tail, const Divergence& div, const int64_t* row_ids, const float* s, float a,
                               float c, float* gk, float* zk) {
  const float aux = s[AUX_KL];
  const int64_t top = static_cast<int64_t>(s[kDistillTop]);
  const float m = x[top], log_s = s[kDistillLogS];
  const Heavy heavy = heavy_entries(x, V, top, log_s);
  if (K == 0) {
    full_vocab_grad(x, y, V, m, log_s, aux, a, c, div);
    x[target] += a;
    rebalance(x, V, heavy);
    return;
  }
  // Support gradients first (they need the original logits of the top-K entries).
  const float pn = s[P_NORM], qn = s[Q_NORM], shift = s[kSupportShift];
  const float gap = s[kSupportGap];
  for (int64_t k = 0; k < K; ++k) {
    zk[k] = x[row_ids[k]];
    const float yk = y[row_ids[k]];
    const float lpk = (zk[k] - s[kSupportMaxZ]) - s[kSupportLogSZ], lqk = (yk - s[kSupportMaxU]) - s[kSupportLogSU];
    float unused;
    gk[k] = c * div.grad(lpk, lqk, support_delta(zk[k], yk, lpk, lqk, gap, unused), aux, shift);
  }
  // The tail bucket's gradient is shared by its members in proportion p_j / p_tail.
  // Without a tail bucket g_tail = 0 and the shift is unused.
  tail_grad(x, V, m, log_s, tail ? c * div.grad(pn, qn, s[kSupportTailDelta], aux, shift) : 0.f,
            tail ? s[kTailMax] : m, tail ? s[kTailLogS] : log_s, a);
  for (int64_t k = 0; k < K; ++k) x[row_ids[k]] = gk[k] - a * std::exp((zk[k] - m) - log_s);
  x[target] += a;
  rebalance(x, V, heavy);
}

void check_chunk(const at::Tensor& z, const char* name) {
  TORCH_CHECK(z.device().is_cpu() && z.scalar_type() == at::kFloat && z.dim() == 2 && z.is_contiguous(),
              name, " must be a contiguous fp32 CPU matrix");
}

// bf16 chunks: the GEMM's output (before bias and temperature) read by the stats passes, and dL/dz written by the
// gradient passes for the backward GEMMs. Converting a row right before (or after) the passes that use it, while it
// is in cache, spares the separate widening and narrowing sweeps over the whole [C, V] chunk. Not fp16: its dL/dz
// takes a power-of-two scale from the whole chunk before it is narrowed (gemm.Gemms.fp16_grad_scale), so the chunk
// loop narrows it; fp16 comes here only as a dW share for accumulate() (`half_ok`).
struct LowRows {
  at::ScalarType dtype = at::kBFloat16;
  char* data = nullptr;  // null: no such chunk
  int64_t rows = 0, cols = 0, row_bytes = 0;
  LowRows() = default;
  LowRows(const c10::optional<at::Tensor>& t, const char* name, bool half_ok = false) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->device().is_cpu() && (t->scalar_type() == at::kBFloat16 ||
                                         (half_ok && t->scalar_type() == at::kHalf)) &&
                    t->is_contiguous() && t->dim() == 2,
                name, half_ok ? " must be a contiguous bf16/fp16 CPU matrix" : " must be a contiguous bf16 CPU matrix");
    dtype = t->scalar_type();
    data = static_cast<char*>(t->data_ptr());
    rows = t->size(0);
    cols = t->size(1);
    row_bytes = cols * t->element_size();
  }
  bool present() const { return data != nullptr; }
  void* row(int64_t i) const { return data + i * row_bytes; }
};

// Element conversions written so that the row loops vectorise (c10's BFloat16 rounding does not): bf16 is the top
// half of an fp32, rounded to nearest even as torch rounds it; fp16 uses the compiler's _Float16 (F16C/AVX-512 FP16
// instructions under -march=native) where it has one.
struct Bf16 {
  using raw = uint16_t;
  static ALWAYS_INLINE float load(uint16_t b) {
    return as_float(static_cast<int32_t>(static_cast<uint32_t>(b) << 16));
  }
  static ALWAYS_INLINE uint16_t store(float f) {
    const uint32_t u = static_cast<uint32_t>(as_int(f));
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? static_cast<uint16_t>(0x7FC0) : rounded;  // NaN stays a quiet NaN
  }
};
struct F16 {
#if defined(__FLT16_MAX__)
  using raw = _Float16;
#else
  using raw = c10::Half;
#endif
  static ALWAYS_INLINE float load(raw h) { return static_cast<float>(h); }
  static ALWAYS_INLINE raw store(float f) { return static_cast<raw>(f); }
};

// dst <- (src + bias) / T in fp32 (bias may be null), as the separate passes of gemm.Gemms.logits compute it: divided,
// as the naive loss divides, since multiplying by a rounded 1/T would scale a whole row by that one rounding error,
// which the row's entropy sums coherently (where gemm.py multiplies, 1/T is exact and the quotient the same bits).
template <typename T, bool kBias, bool kDivide>
void widen_row_as(const typename T::raw* __restrict src, float* __restrict dst, int64_t n,
                  const float* __restrict bias, float t) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float v = kBias ? T::load(src[j]) + bias[j] : T::load(src[j]);
    dst[j] = kDivide ? v / t : v;
  }
}

template <typename T>
void widen_row(const typename T::raw* src, float* dst, int64_t n, const float* bias, float t) {
  if (bias)
    t == 1.f ? widen_row_as<T, true, false>(src, dst, n, bias, t) : widen_row_as<T, true, true>(src, dst, n, bias, t);
  else
    t == 1.f ? widen_row_as<T, false, false>(src, dst, n, bias, t) : widen_row_as<T, false, true>(src, dst, n, bias, t);
}

template <typename T>
void narrow_row(const float* __restrict src, typename T::raw* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = T::store(src[j]);
}

void widen(const LowRows& low, int64_t i, float* dst, int64_t n, const float* bias, float temperature) {
  if (low.present()) widen_row<Bf16>(static_cast<const Bf16::raw*>(low.row(i)), dst, n, bias, temperature);
}

void narrow(const LowRows& low, int64_t i, const float* src, int64_t n) {
  if (low.present()) narrow_row<Bf16>(src, static_cast<Bf16::raw*>(low.row(i)), n);
}

const float* bias_data(const c10::optional<at::Tensor>& bias, int64_t V) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                  bias->dim() == 1 && bias->size(0) == V,
              "bias must be a contiguous fp32 CPU vector of the vocabulary's length");
  return bias->data_ptr<float>();
}


// The student's chunk as the passes see it: an fp32 [C, V] matrix worked on in place, or (bf16 GEMMs) the
// GEMM's low-precision output, each row widened into per-thread scratch ((x + b) / T) as a pass needs it and,
// in the gradient pass, overwritten with dL/dz. The low-precision chunk then needs no fp32 [C, V] copy at all, and a
// row's fp32 form never leaves the cache.
struct StudentRows {
  float* fp32 = nullptr;
  LowRows low;
  const float* bias = nullptr;
  float temperature = 1.f;
  int64_t C = 0, V = 0;
  StudentRows(const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& low_z,
              const c10::optional<at::Tensor>& bias_t, double temperature)
      : low(low_z, "low_z"), temperature(static_cast<float>(temperature)) {
    TORCH_CHECK(z.has_value() != low.present(), "give the student chunk either as z (fp32) or as low_z, not both");
    if (z.has_value()) {
      check_chunk(*z, "z");
      fp32 = z->data_ptr<float>();
      C = z->size(0);
      V = z->size(1);
    } else {
      C = low.rows;
      V = low.cols;
    }
    bias = bias_data(bias_t, V);
    TORCH_CHECK(V < kMaxVocab, "the CPU kernel supports a vocabulary below 2^24, got ", V);
  }
  // Scratch a thread needs for load(): one row, or nothing when the chunk is fp32.
  int64_t scratch_size() const { return fp32 ? 0 : V; }
  float* load(int64_t i, float* scratch) const {
    if (fp32) return fp32 + i * V;
    widen(low, i, scratch, V, bias, temperature);
    return scratch;
  }
  void store(int64_t i, const float* x) const {
    if (!fp32) narrow(low, i, x, V);
  }
};


void student_row_stats(const float* __restrict x, int64_t n, int64_t target, float* __restrict out) {
  const int64_t top = row_argmax(x, n);
  const RowNorm norm = row_lse_entropy(x, n, top);
  out[LSE] = norm.lse;
  out[LOGP] = (x[target] - x[top]) - norm.log_s;  // shifted, as log_softmax: x - lse rounds at |lse|
  out[ENTROPY] = norm.entropy;
  out[kStudentTop] = static_cast<float>(top);
  out[kStudentLogS] = norm.log_s;
}

// Entries [b, e) of a student row's gradient, written in place; returns their sum. Log-probs are (x - m) - log s
// (m the row max), rounded like log_softmax: x - lse would round them at |lse|.
ALWAYS_INLINE float student_grad_span(float* __restrict x, int64_t b, int64_t e, float m, float log_s, float h,
                                      float a, float c) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = b; j < e; ++j) {
    float lp = (x[j] - m) - log_s, p = vexp(lp), g = p > 0.f ? -a * p - c * p * (lp + h) : 0.f;  // -inf: 0
    x[j] = g;
    s += g;
  }
  return s;
}

// One pass writes the row and sums its light entries (spans between the heavy ones) for the rebalance.
void student_row_grad(float* __restrict x, int64_t n, int64_t target, int64_t top, float log_s, float h, float a,
                      float c) {
  const float m = x[top];
  const Heavy heavy = heavy_entries(x, n, top, log_s);
  float own[kMaxHeavy], light = 0.f;
  bool target_heavy = false;
  int64_t b = 0;
  for (int k = 0; k < heavy.n; ++k) {
    const int64_t j = heavy.id[k];
    light += student_grad_span(x, b, j, m, log_s, h, a, c);
    own[k] = student_grad_span(x, j, j + 1, m, log_s, h, a, c);
    if (j == target) {
      own[k] += a;
      target_heavy = true;
    }
    b = j + 1;
  }
  light += student_grad_span(x, b, n, m, log_s, h, a, c);
  if (!target_heavy) {
    x[target] += a;
    light += a;
  }
  if (heavy.n) set_heavy(x, heavy, own, light);
}

at::Tensor student_stats(const c10::optional<at::Tensor>& z, const at::Tensor& targets,
                         const c10::optional<at::Tensor>& low_z, const c10::optional<at::Tensor>& bias,
                         double temperature) {
  const StudentRows rows(z, low_z, bias, temperature);
  const int64_t C = rows.C, V = rows.V;
  auto out = at::empty({C, kStudentCols}, targets.options().dtype(at::kFloat));
  const int64_t* yp = targets.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
    std::vector<float> scratch(rows.scratch_size());
    for (int64_t i = b; i < e; ++i) student_row_stats(rows.load(i, scratch.data()), V, yp[i], op + i * kStudentCols);
  });
  return out;
}

// The student chunk <- c_logp (onehot(y) - p) - c_ent p (log p + H), in place (bf16 for low_z).
void student_grad(const c10::optional<at::Tensor>& z, const at::Tensor& targets, const at::Tensor& stats,
                  const at::Tensor& c_logp, const c10::optional<at::Tensor>& c_ent,
                  const c10::optional<at::Tensor>& low_z, const c10::optional<at::Tensor>& bias, double temperature) {
  const StudentRows rows(z, low_z, bias, temperature);
  const int64_t C = rows.C, V = rows.V, ns = stats.size(1);
  const int64_t* yp = targets.data_ptr<int64_t>();
  const float* sp = stats.data_ptr<float>();
  const float* cl = c_logp.data_ptr<float>();
  const float* ce = c_ent.has_value() ? c_ent->data_ptr<float>() : nullptr;
  at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
    std::vector<float> scratch(rows.scratch_size());
    for (int64_t i = b; i < e; ++i) {
      float* x = rows.load(i, scratch.data());
      student_row_grad(x, V, yp[i], static_cast<int64_t>(sp[i * ns + kStudentTop]), sp[i * ns + kStudentLogS], sp[i * ns + ENTROPY], cl[i], ce ? ce[i] : 0.f);
      rows.store(i, x);
    }
  });
}

// The teacher's chunk u is always fp32 (the stats pass leaves there what the gradient pass needs, see row_ops.py);
// with `low_u` it is first filled from it row by row, as the student's rows are from `low_z`.
std::tuple<at::Tensor, at::Tensor> distill_stats(const c10::optional<at::Tensor>& z, at::Tensor u,
                                                 const at::Tensor& targets, double alpha, int64_t topk, bool tail,
                                                 const c10::optional<at::Tensor>& low_z,
                                                 const c10::optional<at::Tensor>& low_u,
                                                 const c10::optional<at::Tensor>& bias, double temperature) {
  const StudentRows rows(z, low_z, bias, temperature);
  check_chunk(u, "u");
  const LowRows lu(low_u, "low_u");
  const int64_t C = rows.C, V = rows.V;
  TORCH_CHECK(u.size(0) == C && u.size(1) == V, "u must have the student chunk's shape");
  TORCH_CHECK(lu.present() == rows.low.present() && (!lu.present() || (lu.rows == C && lu.cols == V)),
              "low_u must be given, shaped like u, exactly when low_z is");
  const int64_t K = topk > 0 && topk < V ? topk : 0;  // 0: full vocabulary
  auto stats = at::zeros({C, kDistillCols}, u.options());
  auto ids = at::empty({C, K}, targets.options());
  float* up = u.data_ptr<float>();
  const int64_t* yp = targets.data_ptr<int64_t>();
  float* sp = stats.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  const Divergence div(alpha);
  at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
    std::vector<float> lp(K + 1), lq(K + 1), exps(K ? 0 : 2 * V), scratch(rows.scratch_size());
    std::vector<float> dl(K + 1), de(K + 1);
    std::vector<double> lqd(K + 1);
    for (int64_t i = b; i < e; ++i) {
      widen(lu, i, up + i * V, V, rows.bias, rows.temperature);
      distill_row_stats(rows.load(i, scratch.data()), up + i * V, V, yp[i], K, tail, div, ip + i * K,
                        sp + i * kDistillCols, lp.data(), lq.data(), dl.data(), de.data(), lqd.data(), exps.data(),
                        exps.data() + (K ? 0 : V));
    }
  });
  return {stats, ids};
}

// The student chunk <- c_logp (onehot(y) - p) + c_div dD/dz, in place (bf16 for low_z).
void distill_grad(const c10::optional<at::Tensor>& z, const at::Tensor& u, const at::Tensor& targets,
                  const at::Tensor& stats, const c10::optional<at::Tensor>& topk_ids, const at::Tensor& c_logp,
                  const at::Tensor& c_div, double alpha, bool tail, const c10::optional<at::Tensor>& low_z,
                  const c10::optional<at::Tensor>& bias, double temperature) {
  const StudentRows rows(z, low_z, bias, temperature);
  check_chunk(u, "u");
  const int64_t C = rows.C, V = rows.V;
  TORCH_CHECK(u.size(0) == C && u.size(1) == V, "u must have the student chunk's shape");
  const int64_t K = topk_ids.has_value() ? topk_ids->size(1) : 0;
  const float* up = u.data_ptr<float>();
  const int64_t* yp = targets.data_ptr<int64_t>();
  const float* sp = stats.data_ptr<float>();
  const int64_t* ip = K ? topk_ids->data_ptr<int64_t>() : nullptr;
  const float* cl = c_logp.data_ptr<float>();
  const float* cd = c_div.data_ptr<float>();
  const Divergence div(alpha);
  at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
    std::vector<float> gk(K + 1), zk(K + 1), scratch(rows.scratch_size());
    for (int64_t i = b; i < e; ++i) {
      float* x = rows.load(i, scratch.data());
      distill_row_grad(x, up + i * V, V, yp[i], K, tail, div, ip ? ip + i * K : nullptr, sp + i * kDistillCols,
                       cl[i], cd[i], gk.data(), zk.data());
      rows.store(i, x);
    }
  });
}

// acc <- beta acc + alpha part for a block of the fp32 dW accumulator and a bf16/fp16 GEMM result of its shape, in
// one pass: torch's mixed-dtype add first widens `part` into a fresh temporary (measured 2x the time of this pass).
// beta = 0 overwrites: the accumulator is not written yet and may hold anything, NaN included. alpha undoes the
// power-of-two scale of an fp16 dL/dz (gemm.py), exactly.
template <typename T>
void accumulate_rows(float* __restrict acc, const typename T::raw* __restrict part, int64_t n, float beta,
                     float alpha) {
  if (beta == 0.f) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] = alpha * T::load(part[j]);
  } else if (beta == 1.f) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] = std::fma(alpha, T::load(part[j]), acc[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] = std::fma(beta, acc[j], alpha * T::load(part[j]));
  }
}

void accumulate(at::Tensor acc, const at::Tensor& part, double beta, double alpha) {
  check_chunk(acc, "acc");
  const LowRows low(part, "part", true);
  TORCH_CHECK(low.rows == acc.size(0) && low.cols == acc.size(1), "part must have acc's shape");
  const int64_t R = acc.size(0), H = acc.size(1);
  float* ap = acc.data_ptr<float>();
  const float b = static_cast<float>(beta), a = static_cast<float>(alpha);
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
    if (low.dtype == at::kBFloat16)
      accumulate_rows<Bf16>(ap + r0 * H, static_cast<const Bf16::raw*>(low.row(r0)), (r1 - r0) * H, b, a);
    else
      accumulate_rows<F16>(ap + r0 * H, static_cast<const F16::raw*>(low.row(r0)), (r1 - r0) * H, b, a);
  });
}

// MKL's bf16/fp16 GEMMs with an fp32 C, exported by torch's CPU build for x86 (LP64 ints, CBLAS enums). Weak, so
// the library still loads where torch has no MKL (Arm): grad_weight_available() then says so and gemm.py adds
// per-block bf16 shares with accumulate() instead.
extern "C" {
void cblas_gemm_bf16bf16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
}
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

bool grad_weight_available() { return cblas_gemm_bf16bf16f32 != nullptr && cblas_gemm_f16f16f32 != nullptr; }

// acc (fp32 [V, H]) <- beta acc + alpha dz^T h for bf16/fp16 dz [C, V] and h [C, H], accumulated in fp32 by the GEMM
// itself: no per-block share rounded to bf16/fp16, no second pass over acc. On 2 Sapphire Rapids cores it ran within
// noise of the blocks' speed in bf16 (blocks / this 0.76-1.09 over three runs) and 1.06-1.46x faster in fp16
// (benchmarks/dw_gemm.py). beta = 0 overwrites (BLAS: C is not read), NaN included.
void grad_weight(at::Tensor acc, const at::Tensor& dz, const at::Tensor& h, double beta, double alpha) {
  TORCH_CHECK(grad_weight_available(), "grad_weight: torch's CPU build has no MKL bf16/fp16 GEMM here");
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.dim() == 2 && acc.stride(1) == 1, "acc must be fp32 [V, H] with "
              "unit column stride");
  TORCH_CHECK(dz.dim() == 2 && h.dim() == 2 && dz.scalar_type() == h.scalar_type() &&
                  (dz.scalar_type() == at::kBFloat16 || dz.scalar_type() == at::kHalf),
              "dz and h must be 2-d bf16 or fp16 of one dtype");
  TORCH_CHECK(dz.stride(1) == 1 && h.stride(1) == 1, "dz and h must have unit column stride");
  TORCH_CHECK(dz.size(0) == h.size(0) && dz.size(1) == acc.size(0) && h.size(1) == acc.size(1),
              "grad_weight: dz [C, V], h [C, H] and acc [V, H] disagree");
  const int64_t lim = std::numeric_limits<int>::max();
  TORCH_CHECK(dz.size(0) <= lim && dz.stride(0) <= lim && h.stride(0) <= lim && acc.stride(0) <= lim &&
                  acc.size(0) <= lim && acc.size(1) <= lim, "grad_weight: a dimension does not fit a 32-bit int");
  const int V = static_cast<int>(acc.size(0)), H = static_cast<int>(acc.size(1)), C = static_cast<int>(dz.size(0));
  if (V == 0 || H == 0) return;
  const auto* a = static_cast<const uint16_t*>(dz.data_ptr());
  const auto* b = static_cast<const uint16_t*>(h.data_ptr());
  auto gemm = dz.scalar_type() == at::kBFloat16 ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
  gemm(kRowMajor, kTrans, kNoTrans, V, H, C, static_cast<float>(alpha), a, static_cast<int>(dz.stride(0)), b,
       static_cast<int>(h.stride(0)), static_cast<float>(beta), acc.data_ptr<float>(),
       static_cast<int>(acc.stride(0)));
}

// Hands the whole pages inside `t`'s bytes back to the OS (Linux: madvise MADV_DONTNEED; a no-op elsewhere): they
// read as zeros afterwards. For a buffer its owner is done with but cannot free yet, e.g. the fp32 dW accumulator
// while it is narrowed into the returned bf16 gradient block by block (gemm.returned_grad), so that the two never
// both exist whole. Only interior pages: a page shared with a neighbouring allocation is never touched.
void discard_pages(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "discard_pages: t must be a contiguous CPU tensor");
#ifdef __linux__
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.numel()) * t.element_size();
  const uintptr_t first = (begin + page - 1) / page * page, last = end / page * page;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
#endif
}

}  // namespace

TORCH_LIBRARY(srpo_kernels, m) {
  // The student chunk is z (fp32, in place) or low_z (the bf16 GEMM output before bias and 1/T; the gradient
  // passes overwrite it with dL/dz): exactly one of the two.
  m.def("student_stats(Tensor? z, Tensor targets, Tensor? low_z, Tensor? bias, float temperature) -> Tensor");
  m.def("student_grad(Tensor(a!)? z, Tensor targets, Tensor stats, Tensor c_logp, Tensor? c_ent, "
        "Tensor(b!)? low_z, Tensor? bias, float temperature) -> ()");
  // distill_stats leaves u as scratch for distill_grad (see row_ops.py).
  m.def("distill_stats(Tensor? z, Tensor(b!) u, Tensor targets, float alpha, int topk, bool tail, Tensor? low_z, "
        "Tensor? low_u, Tensor? bias, float temperature) -> (Tensor, Tensor)");
  m.def("distill_grad(Tensor(a!)? z, Tensor u, Tensor targets, Tensor stats, Tensor? topk_ids, Tensor c_logp, "
        "Tensor c_div, float alpha, bool tail, Tensor(b!)? low_z, Tensor? bias, float temperature) -> ()");
  m.def("accumulate(Tensor(a!) acc, Tensor part, float beta, float alpha=1.) -> ()");
  m.def("grad_weight_available() -> bool", &grad_weight_available);
  m.def("grad_weight(Tensor(a!) acc, Tensor dz, Tensor h, float beta, float alpha=1.) -> ()");
  m.def("discard_pages(Tensor(a!) t) -> ()");
}

TORCH_LIBRARY_IMPL(srpo_kernels, CPU, m) {
  m.impl("student_stats", &student_stats);
  m.impl("student_grad", &student_grad);
  m.impl("distill_stats", &distill_stats);
  m.impl("distill_grad", &distill_grad);
  m.impl("accumulate", &accumulate);
  m.impl("grad_weight", &grad_weight);
  m.impl("discard_pages", &discard_pages);
}
