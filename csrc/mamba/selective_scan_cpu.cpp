// Selective scan on CPU: one sequential fp32 scan per (sequence, channel), OpenMP over the pairs.
//
// Serves mamba_ssm's batched form and vLLM's packed varlen form with a state cache. The Python
// side hands over fp32 tensors in a common layout: u, delta, z, out as [Bu, D, L] with unit
// stride along L (Bu = 1 and sequence bounds from query_start_loc when packed), B and C
// token-major as [Bb, G, L, N] with unit stride along N (a per-channel [D, N] matrix arrives as a
// [1, D, L, N] view with zero batch and token strides), state as [slots, D, N].
// Per chunk of tokens the step sizes (softplus) are computed vectorised over tokens; then each
// token updates all N states at once, vectorised over N, with a polynomial exp2.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

// Lets GCC if-convert the clamps below and vectorise the loops that use them; results are
// unchanged (it only drops the promise to keep floating-point exception flags exact). Header
// functions compiled without it are not inlined here, so the hot code calls none (no std::min).
#pragma GCC optimize("no-trapping-math")

namespace {

constexpr int64_t CHUNK = 64;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// 2^x for fp32, |relative error| < 1e-7: x = k + f with f in [-0.5, 0.5), 2^f by its degree-7
// Taylor polynomial, k added to the exponent bits. Clamped to [-126, 126] (normal floats only).
inline float exp2_approx(float x) {
  x = x < -126.0f ? -126.0f : (x > 126.0f ? 126.0f : x);
  const int32_t k = static_cast<int32_t>(x + 126.5f) - 126;  // round to nearest, vectorisable
  const float f = (x - static_cast<float>(k)) * LN2;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  return __builtin_bit_cast(float, __builtin_bit_cast(int32_t, p) + (k << 23));
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), log1p(e) = 2 atanh(e / (2 + e)) by its series
// (e <= 1, so the argument is <= 1/3 and 7 terms reach fp32 precision). Above 20 this differs
// from x by < 3e-9, below fp32 resolution, matching torch's threshold-20 pass-through.
inline float softplus(float x) {
  const float e = exp2_approx(-__builtin_fabsf(x) * LOG2E);
  const float s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return (x > 0.0f ? x : 0.0f) + 2.0f * s * p;
}

struct Channel {
  const float *u, *dt, *z, *B, *C;  // u, dt, z at the sequence start; B, C at (batch, group)
  float* out;
  int64_t sBl, sCl;  // token strides of B and C (0 for a per-channel matrix)
  float bias, dskip;
};

// Scan tokens [0, len) of one channel; h [N] is the state in and out, w scratch of 3 * CHUNK.
void scan_channel(const Channel& c, int64_t len, int64_t dstate, bool delta_softplus,
                  const float* __restrict A2, float* __restrict h, float* __restrict w) {
  float* __restrict dtv = w;
  float* __restrict du = w + CHUNK;
  float* __restrict y = w + 2 * CHUNK;
  for (int64_t c0 = 0; c0 < len; c0 += CHUNK) {
    const int64_t n_tok = len - c0 < CHUNK ? len - c0 : CHUNK;
    const float* __restrict u = c.u + c0;
    const float* __restrict dt = c.dt + c0;
    if (delta_softplus) {
#pragma omp simd
      for (int64_t i = 0; i < n_tok; ++i) dtv[i] = softplus(dt[i] + c.bias);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n_tok; ++i) dtv[i] = dt[i] + c.bias;
    }
#pragma omp simd
    for (int64_t i = 0; i < n_tok; ++i) du[i] = dtv[i] * u[i];
    for (int64_t i = 0; i < n_tok; ++i) {
      const float* __restrict Bi = c.B + (c0 + i) * c.sBl;
      const float* __restrict Ci = c.C + (c0 + i) * c.sCl;
      const float dti = dtv[i], dui = du[i];
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t n = 0; n < dstate; ++n) {
        h[n] = exp2_approx(dti * A2[n]) * h[n] + dui * Bi[n];
        acc += h[n] * Ci[n];
      }
      y[i] = acc;
    }
    float* __restrict o = c.out + c0;
    if (c.z) {
      const float* __restrict z = c.z + c0;
#pragma omp simd
      for (int64_t i = 0; i < n_tok; ++i)
        o[i] = (y[i] + c.dskip * u[i]) * z[i] / (1.0f + exp2_approx(-z[i] * LOG2E));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n_tok; ++i) o[i] = y[i] + c.dskip * u[i];
    }
  }
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), name, " must be a CPU float32 tensor");
}

const float* opt_ptr(const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return nullptr;
  check_f32(*t, name);
  return t->data_ptr<float>();
}

void selective_scan_cpu(const at::Tensor& out, const std::optional<at::Tensor>& state, const at::Tensor& u,
                        const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                        const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                        const std::optional<at::Tensor>& query_start_loc,
                        const std::optional<at::Tensor>& cache_indices,
                        const std::optional<at::Tensor>& has_initial_state, int64_t pad_slot_id) {
  for (auto [t, name] : {std::pair{&out, "out"}, {&u, "u"}, {&delta, "delta"}, {&A, "A"}, {&B, "B"}, {&C, "C"}})
    check_f32(*t, name);
  TORCH_CHECK(u.dim() == 3 && B.dim() == 4 && C.dim() == 4, "selective_scan_cpu: u must be 3-D, B and C 4-D");
  for (const at::Tensor* t : {&out, &u, &delta, z ? &*z : &u})
    TORCH_CHECK(t->size(2) <= 1 || t->stride(2) == 1, "selective_scan_cpu: u, delta, z, out need unit stride along L");
  // a size-1 (or empty) dimension keeps any stride through .contiguous(): only a longer N needs unit stride
  for (const at::Tensor* t : {&B, &C})
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, "selective_scan_cpu: B and C need unit stride along N");
  const bool varlen = query_start_loc.has_value();
  const int64_t dim = u.size(1), dstate = A.size(1), seqlen = u.size(2);
  const int64_t n_seq = varlen ? query_start_loc->size(0) - 1 : u.size(0);
  const int64_t dim_per_gb = dim / B.size(1), dim_per_gc = dim / C.size(1);
  const int64_t* qsl = varlen ? query_start_loc->data_ptr<int64_t>() : nullptr;
  const int64_t* cache = cache_indices.has_value() ? cache_indices->data_ptr<int64_t>() : nullptr;
  const bool* has_init = has_initial_state.has_value() ? has_initial_state->data_ptr<bool>() : nullptr;
  float* st = state.has_value() ? (check_f32(*state, "state"), state->data_ptr<float>()) : nullptr;
  const int64_t n_slots = st ? state->size(0) : 0;
  TORCH_CHECK(!st || cache || n_seq <= n_slots, "selective_scan_cpu: ", n_seq, " sequences but ", n_slots,
              " state rows and no cache_indices");
  const float *pD = opt_ptr(D, "D"), *pz = opt_ptr(z, "z"), *pbias = opt_ptr(delta_bias, "delta_bias");
  const float *pu = u.data_ptr<float>(), *pdt = delta.data_ptr<float>(), *pA = A.data_ptr<float>();

#pragma omp parallel
  {
    std::vector<float> buf(3 * CHUNK + 2 * dstate);
    float *w = buf.data(), *h = w + 3 * CHUNK, *A2 = h + dstate;
#pragma omp for collapse(2) schedule(dynamic, 8)
    for (int64_t s = 0; s < n_seq; ++s) {
      for (int64_t d = 0; d < dim; ++d) {
        const int64_t slot = cache ? cache[s] : s;
        // the pad slot, or a slot outside the cache (the Python side refuses one): nothing read or written
        if (cache && (slot == pad_slot_id || slot < 0 || slot >= n_slots)) continue;
        const int64_t bi = varlen ? 0 : s, t0 = varlen ? qsl[s] : 0, t1 = varlen ? qsl[s + 1] : seqlen;
        const int64_t bb = varlen ? 0 : s;
        Channel c{pu + bi * u.stride(0) + d * u.stride(1) + t0,
                  pdt + bi * delta.stride(0) + d * delta.stride(1) + t0,
                  pz ? pz + bi * z->stride(0) + d * z->stride(1) + t0 : nullptr,
                  B.data_ptr<float>() + bb * B.stride(0) + (d / dim_per_gb) * B.stride(1) + t0 * B.stride(2),
                  C.data_ptr<float>() + bb * C.stride(0) + (d / dim_per_gc) * C.stride(1) + t0 * C.stride(2),
                  out.data_ptr<float>() + bi * out.stride(0) + d * out.stride(1) + t0,
                  B.stride(2), C.stride(2),
                  pbias ? pbias[d * delta_bias->stride(0)] : 0.0f,
                  pD ? pD[d * D->stride(0)] : 0.0f};
        float* sb = st ? st + slot * state->stride(0) + d * state->stride(1) : nullptr;
        const bool load = sb && has_init && has_init[s];
        for (int64_t n = 0; n < dstate; ++n) {
          h[n] = load ? sb[n * state->stride(2)] : 0.0f;
          A2[n] = pA[d * A.stride(0) + n * A.stride(1)] * LOG2E;
        }
        scan_channel(c, t1 - t0, dstate, delta_softplus, A2, h, w);
        if (sb)
          for (int64_t n = 0; n < dstate; ++n) sb[n * state->stride(2)] = h[n];
      }
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ifk, m) {
  m.def(
      "selective_scan_cpu(Tensor(a!) out, Tensor(b!)? state, Tensor u, Tensor delta, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor? query_start_loc, "
      "Tensor? cache_indices, Tensor? has_initial_state, int pad_slot_id) -> ()");
}

TORCH_LIBRARY_IMPL(ifk, CPU, m) { m.impl("selective_scan_cpu", &selective_scan_cpu); }
