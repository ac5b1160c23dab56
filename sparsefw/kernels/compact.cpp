// Compare and compact in one pass (CPU): the flat indices, increasing, of the candidate
// entries whose score is not strictly worse than a threshold t. The pre-filter of the exact
// top-k selection of topology updates (sparsefw.topology._kept), which numpy does in four
// passes over the layer (two comparisons, a combination with the candidate mask, a nonzero).
//
// "Worse" is, with largest, s < t (magnitude: -t < s < t, that is |s| < t for t >= 0), and
// without, s > t (magnitude: s > t or s < -t). A NaN score compares false both ways, so it is
// never worse: it is kept, as numpy's comparisons keep it. Candidates are the nonzero entries
// of a bool or float32 tensor of the same size.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "kernels.h"

namespace {

constexpr int64_t kGrain = 1 << 18;

template <bool kLargest, bool kMagnitude>
inline bool worse(float s, float t) {
  if (kLargest) return kMagnitude ? (s < t && s > -t) : s < t;
  return kMagnitude ? (s > t || s < -t) : s > t;
}

template <bool kLargest, bool kMagnitude>
inline uint32_t worse_bits(const float* s, __m256 t, __m256 neg_t) {
  const __m256 v = _mm256_loadu_ps(s);
  __m256 w;
  if (kLargest) {
    w = _mm256_cmp_ps(v, t, _CMP_LT_OQ);  // ordered: false for a NaN
    if (kMagnitude) w = _mm256_and_ps(w, _mm256_cmp_ps(v, neg_t, _CMP_GT_OQ));
  } else {
    w = _mm256_cmp_ps(v, t, _CMP_GT_OQ);
    if (kMagnitude) w = _mm256_or_ps(w, _mm256_cmp_ps(v, neg_t, _CMP_LT_OQ));
  }
  return static_cast<uint32_t>(_mm256_movemask_ps(w));
}

// one bit per entry of 32 candidates: set where the candidate entry is nonzero
inline uint32_t candidate_bits(const uint8_t* c) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
  return ~static_cast<uint32_t>(
      _mm256_movemask_epi8(_mm256_cmpeq_epi8(bytes, _mm256_setzero_si256())));
}

inline uint32_t candidate_bits(const float* c) {
  uint32_t bits = 0;
  for (int j = 0; j < 4; ++j) {
    bits |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(
                _mm256_loadu_ps(c + 8 * j), _mm256_setzero_ps(), _CMP_NEQ_UQ)))
            << (8 * j);
  }
  return bits;
}

// the positions of the set bits of every byte value, in increasing order
struct Positions {
  alignas(8) uint8_t at[256][8];
  Positions() {
    for (int b = 0; b < 256; ++b) {
      int n = 0;
      for (int j = 0; j < 8; ++j) {
        if (b & (1 << j)) at[b][n++] = static_cast<uint8_t>(j);
      }
      for (; n < 8; ++n) at[b][n] = 0;
    }
  }
};
const Positions kPositions;

// writes base + the positions of the set bits of ``bits`` (8 of them at most) to dst, always
// eight entries (the caller keeps room): no branch on how many there are
inline int64_t* emit8(int64_t* dst, uint32_t bits, int64_t base) {
  const __m128i at = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kPositions.at[bits]));
  const __m256i b = _mm256_set1_epi64x(base);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm256_add_epi64(_mm256_cvtepu8_epi64(at), b));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 4),
                      _mm256_add_epi64(_mm256_cvtepu8_epi64(_mm_srli_si128(at, 4)), b));
  return dst + __builtin_popcount(bits);
}

template <bool kLargest, bool kMagnitude, typename C>
void kept_range(const float* s, const C* c, float t, int64_t begin, int64_t end,
                std::vector<int64_t>& out) {
  const __m256 vt = _mm256_set1_ps(t), neg_t = _mm256_set1_ps(-t);
  size_t used = 0;
  int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    if (out.size() < used + 32) out.resize(2 * out.size() + 64);
    const uint32_t keep = candidate_bits(c + i) &
        ~(worse_bits<kLargest, kMagnitude>(s + i, vt, neg_t) |
          worse_bits<kLargest, kMagnitude>(s + i + 8, vt, neg_t) << 8 |
          worse_bits<kLargest, kMagnitude>(s + i + 16, vt, neg_t) << 16 |
          worse_bits<kLargest, kMagnitude>(s + i + 24, vt, neg_t) << 24);
    if (keep == 0) continue;
    int64_t* dst = out.data() + used;
    dst = emit8(dst, keep & 0xFFu, i);
    dst = emit8(dst, (keep >> 8) & 0xFFu, i + 8);
    dst = emit8(dst, (keep >> 16) & 0xFFu, i + 16);
    dst = emit8(dst, keep >> 24, i + 24);
    used = static_cast<size_t>(dst - out.data());
  }
  out.resize(used);
  for (; i < end; ++i) {
    if (c[i] != 0 && !worse<kLargest, kMagnitude>(s[i], t)) out.push_back(i);
  }
}

template <typename C>
void kept_dispatch(const float* s, const C* c, float t, bool largest, bool magnitude,
                   int64_t begin, int64_t end, std::vector<int64_t>& out) {
  if (largest && magnitude) kept_range<true, true>(s, c, t, begin, end, out);
  else if (largest) kept_range<true, false>(s, c, t, begin, end, out);
  else if (magnitude) kept_range<false, true>(s, c, t, begin, end, out);
  else kept_range<false, false>(s, c, t, begin, end, out);
}

}  // namespace

at::Tensor kept_indices(const at::Tensor& scores, const at::Tensor& candidates, double threshold,
                        bool largest, bool magnitude, int64_t expected) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat &&
                  scores.is_contiguous(),
              "kept_indices: the scores must be a contiguous float32 CPU tensor");
  TORCH_CHECK(candidates.device().is_cpu() && candidates.is_contiguous() &&
                  (candidates.scalar_type() == at::kBool ||
                   candidates.scalar_type() == at::kFloat),
              "kept_indices: the candidates must be a contiguous bool or float32 CPU tensor");
  TORCH_CHECK(candidates.numel() == scores.numel(), "kept_indices: ", candidates.numel(),
              " candidates for ", scores.numel(), " scores");
  const int64_t n = scores.numel();
  const float t = static_cast<float>(threshold);
  const float* s = scores.data_ptr<float>();
  const bool is_bool = candidates.scalar_type() == at::kBool;
  const void* c = candidates.data_ptr();
  // each range of the parallel loop collects its own indices; joined in order afterwards
  std::vector<std::pair<int64_t, std::vector<int64_t>>> parts;
  std::mutex lock;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    // room for the expected share of kept entries (grown by doubling when short)
    std::vector<int64_t> out(static_cast<size_t>(std::max<int64_t>(
        64, (expected + expected / 8) * (end - begin) / std::max<int64_t>(n, 1) + 64)));
    if (is_bool) {
      kept_dispatch(s, static_cast<const uint8_t*>(c), t, largest, magnitude, begin, end, out);
    } else {
      kept_dispatch(s, static_cast<const float*>(c), t, largest, magnitude, begin, end, out);
    }
    std::lock_guard<std::mutex> guard(lock);
    parts.emplace_back(begin, std::move(out));
  });
  std::sort(parts.begin(), parts.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  int64_t total = 0;
  for (const auto& part : parts) total += static_cast<int64_t>(part.second.size());
  at::Tensor result = at::empty({total}, scores.options().dtype(at::kLong));
  int64_t* dst = result.data_ptr<int64_t>();
  for (const auto& part : parts) {
    std::memcpy(dst, part.second.data(), part.second.size() * sizeof(int64_t));
    dst += part.second.size();
  }
  return result;
}
