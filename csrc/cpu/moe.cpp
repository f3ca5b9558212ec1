// MoE routing gate on the CPU (semantics: r1kernels/reference/moe.py, moe_route).
//
// Letters: T tokens, E experts, G groups, P = E / G experts per group, K experts chosen per token.
//
// Tokens are independent, so OpenMP splits them among threads. Each thread has its own scratch rows
// (allocated once per call, outside the token loop) and its own [E] counts; the per-thread counts are
// summed in thread order after the loop (integer sums: exact, so the result does not depend on the
// thread count). Per token, everything is fp32 as in the reference: scores, choice = scores + bias, the
// group scores, then the K best choices.
//
// Order: the reference takes a stable descending sort, so among equal values the lower index comes
// first. Here the K best are kept in a small sorted list that candidates enter in ascending index
// order; a candidate only moves past entries it is strictly greater than, which is the same order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common.h"
#include "../ops.h"

namespace r1k {
namespace {

// Below this many logits per call, a parallel region costs more (thread wake-up) than it saves.
constexpr int64_t kParallelMinElems = int64_t{1} << 14;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Offers candidate (v, i) to the list (vals, idx) of the best `cap` so far, best first, n entries long.
// Candidates must come in ascending index: an equal value then never displaces an earlier entry.
inline void offer(float* vals, int* idx, int& n, int cap, float v, int i) {
  if (n == cap && !(v > vals[n - 1])) return;
  int pos = n < cap ? n : cap - 1;  // a full list drops its last entry
  while (pos > 0 && v > vals[pos - 1]) {
    vals[pos] = vals[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  vals[pos] = v;
  idx[pos] = i;
  if (n < cap) ++n;
}

// One thread's scratch: a row of scores and of choices ([E]), group scores and flags ([G]), and the
// sorted lists of the best groups / experts.
struct Scratch {
  explicit Scratch(const MoeRouteArgs& a)
      : scores(a.n_experts), choice(a.n_experts), gscore(a.n_group), gkeep(a.n_group),
        top_v(std::max(a.top_k, a.topk_group)), top_i(top_v.size()) {}
  std::vector<float> scores, choice, gscore;
  std::vector<char> gkeep;
  std::vector<float> top_v;
  std::vector<int> top_i;
};

template <int DT>
void route_token(const MoeRouteArgs& a, int64_t t, Scratch& s, int32_t* counts) {
  using S = storage_t<DT>;
  const S* row = static_cast<const S*>(a.logits) + t * a.stride_t;
  const int E = a.n_experts, G = a.n_group, P = E / G, K = a.top_k;
  float* scores = s.scores.data();
  float* choice = s.choice.data();

  if (a.softmax) {
    float mx = kNegInf;
    for (int e = 0; e < E; ++e) {
      scores[e] = widen<DT>(row[e * a.stride_e]);
      mx = std::max(mx, scores[e]);
    }
    float sum = 0.f;
    for (int e = 0; e < E; ++e) {
      scores[e] = std::exp(scores[e] - mx);
      sum += scores[e];
    }
    for (int e = 0; e < E; ++e) scores[e] /= sum;
  } else {
    // torch's formula for the fp32 sigmoid, 1 / (1 + exp(-x)).
    for (int e = 0; e < E; ++e) scores[e] = 1.f / (1.f + std::exp(-widen<DT>(row[e * a.stride_e])));
  }
  for (int e = 0; e < E; ++e) choice[e] = a.bias != nullptr ? scores[e] + a.bias[e] : scores[e];

  if (G > 1) {
    int n = 0;
    for (int g = 0; g < G; ++g) {
      // top1 / top2 as torch.topk(2) gives them: a tied maximum fills both.
      float top1 = kNegInf, top2 = kNegInf;
      for (int p = 0; p < P; ++p) {
        const float v = choice[g * P + p];
        if (v > top1) {
          top2 = top1;
          top1 = v;
        } else if (v > top2) {
          top2 = v;
        }
      }
      s.gscore[g] = (a.top2_sum && P >= 2) ? top1 + top2 : top1;
      s.gkeep[g] = 0;
      offer(s.top_v.data(), s.top_i.data(), n, a.topk_group, s.gscore[g], g);
    }
    for (int j = 0; j < n; ++j) s.gkeep[s.top_i[j]] = 1;
    // Dropped groups' experts are masked with -inf, not 0.0: biased scores can be negative.
    for (int e = 0; e < E; ++e)
      if (!s.gkeep[e / P]) choice[e] = kNegInf;
  }

  int n = 0;
  for (int e = 0; e < E; ++e) offer(s.top_v.data(), s.top_i.data(), n, K, choice[e], e);

  float* w = a.weights + t * K;
  int32_t* ids = a.expert_ids + t * K;
  float sum = 0.f;
  for (int k = 0; k < K; ++k) {
    const int e = s.top_i[k];
    ids[k] = e;
    w[k] = scores[e];
    sum += scores[e];
    ++counts[e];
  }
  // As the reference: w / (sum + 1e-20), then the scale.
  const float denom = sum + 1e-20f;
  for (int k = 0; k < K; ++k) w[k] = (a.norm ? w[k] / denom : w[k]) * a.scale;
}

template <int DT>
void route_all(const MoeRouteArgs& a, int num_threads) {
  const int64_t T = a.n_tokens;
  const int E = a.n_experts;
#ifdef _OPENMP
  const bool parallel = T > 1 && T * E >= kParallelMinElems;
  const int nt = parallel ? (num_threads > 0 ? num_threads : omp_get_max_threads()) : 1;
#else
  (void)num_threads;
  const int nt = 1;
#endif
  // Row th * E holds thread th's counts.
  std::vector<int32_t> partial(static_cast<size_t>(nt) * E, 0);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (parallel)
#endif
  {
#ifdef _OPENMP
    const int th = omp_get_thread_num();
#else
    const int th = 0;
#endif
    Scratch s(a);
    int32_t* counts = partial.data() + static_cast<size_t>(th) * E;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t t = 0; t < T; ++t) route_token<DT>(a, t, s, counts);
  }
  for (int th = 0; th < nt; ++th)
    for (int e = 0; e < E; ++e) a.counts[e] += partial[static_cast<size_t>(th) * E + e];
}

}  // namespace

void moe_route_cpu(const MoeRouteArgs& a, int num_threads) {
  if (a.n_tokens == 0) return;
  switch (a.dtype) {
    case kFloat32: return route_all<kFloat32>(a, num_threads);
    case kFloat16: return route_all<kFloat16>(a, num_threads);
    case kBFloat16: return route_all<kBFloat16>(a, num_threads);
    default: R1K_CHECK(false, "moe_route_cpu: dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", a.dtype);
  }
}

}  // namespace r1k
