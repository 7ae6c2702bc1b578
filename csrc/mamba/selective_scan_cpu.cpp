// Selective scan on CPU: one sequential fp32 scan per (sequence, channel), OpenMP over the pairs.
//
// Serves mamba_ssm's batched form and vLLM's packed varlen form with a state cache. The Python
// side hands over fp32 tensors in a common layout: u, delta, z, out as [Bu, D, L] (Bu = 1 and
// sequence bounds from query_start_loc when packed), B and C as [Bb, G, N, L] (a per-channel
// [D, N] matrix arrives as a [1, D, N, L] view with zero strides), state as [slots, D, N].
// Tokens go in chunks of CHUNK: exp2 of the whole [N, CHUNK] block first (vectorised by the
// compiler), then the short serial recurrence per state.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

constexpr int64_t CHUNK = 64;
constexpr float LOG2E = 1.4426950408889634f;

// 2^x for fp32, |relative error| < 1e-7: x = k + f with f in [-0.5, 0.5], 2^f by its degree-7
// Taylor polynomial, k added to the exponent bits. Clamped to [-126, 126] (normal floats only).
inline float exp2_approx(float x) {
  x = std::min(std::max(x, -126.0f), 126.0f);
  const float k = std::nearbyint(x);
  const float f = (x - k) * 0.6931471805599453f;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  int32_t bits;
  __builtin_memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(k) << 23;
  __builtin_memcpy(&p, &bits, 4);
  return p;
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
  const bool varlen = query_start_loc.has_value();
  const int64_t dim = u.size(1), dstate = A.size(1), seqlen = u.size(2);
  const int64_t n_seq = varlen ? query_start_loc->size(0) - 1 : u.size(0);
  const int64_t dim_per_gb = dim / B.size(1), dim_per_gc = dim / C.size(1);
  const int64_t* qsl = varlen ? query_start_loc->data_ptr<int64_t>() : nullptr;
  const int64_t* cache = cache_indices.has_value() ? cache_indices->data_ptr<int64_t>() : nullptr;
  const bool* has_init = has_initial_state.has_value() ? has_initial_state->data_ptr<bool>() : nullptr;
  float* st = state.has_value() ? (check_f32(*state, "state"), state->data_ptr<float>()) : nullptr;
  const float *pD = opt_ptr(D, "D"), *pz = opt_ptr(z, "z"), *pbias = opt_ptr(delta_bias, "delta_bias");
  const float *pu = u.data_ptr<float>(), *pdt = delta.data_ptr<float>(), *pA = A.data_ptr<float>();
  const float *pB = B.data_ptr<float>(), *pC = C.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t sBl = B.stride(3), sCl = C.stride(3);

#pragma omp parallel
  {
    std::vector<float> buf(2 * (dstate + 1) * CHUNK + 2 * dstate + CHUNK);
    float *dA = buf.data(), *dBu = dA + dstate * CHUNK, *dtv = dBu + dstate * CHUNK, *du = dtv + CHUNK;
    float *y = du + CHUNK, *h = y + CHUNK, *A2 = h + dstate;
#pragma omp for collapse(2) schedule(dynamic, 8)
    for (int64_t s = 0; s < n_seq; ++s) {
      for (int64_t d = 0; d < dim; ++d) {
        const int64_t slot = cache ? cache[s] : s;
        if (cache && slot == pad_slot_id) continue;
        const int64_t bi = varlen ? 0 : s, t0 = varlen ? qsl[s] : 0, t1 = varlen ? qsl[s + 1] : seqlen;
        const float* ub = pu + bi * u.stride(0) + d * u.stride(1);
        const float* db = pdt + bi * delta.stride(0) + d * delta.stride(1);
        const float* zb = pz ? pz + bi * z->stride(0) + d * z->stride(1) : nullptr;
        float* ob = po + bi * out.stride(0) + d * out.stride(1);
        const float* Bb = pB + (varlen ? 0 : s * B.stride(0)) + (d / dim_per_gb) * B.stride(1);
        const float* Cb = pC + (varlen ? 0 : s * C.stride(0)) + (d / dim_per_gc) * C.stride(1);
        float* sb = st ? st + slot * state->stride(0) + d * state->stride(1) : nullptr;
        const bool load = sb && has_init && has_init[s];
        for (int64_t n = 0; n < dstate; ++n) {
          h[n] = load ? sb[n * state->stride(2)] : 0.0f;
          A2[n] = pA[d * A.stride(0) + n * A.stride(1)] * LOG2E;
        }
        const float bias = pbias ? pbias[d * delta_bias->stride(0)] : 0.0f;
        const float dskip = pD ? pD[d * D->stride(0)] : 0.0f;
        for (int64_t c0 = t0; c0 < t1; c0 += CHUNK) {
          const int64_t len = std::min(CHUNK, t1 - c0);
          for (int64_t i = 0; i < len; ++i) {
            float dt = db[c0 + i] + bias;
            if (delta_softplus && dt <= 20.0f) dt = std::log1p(std::exp(dt));
            dtv[i] = dt;
            du[i] = dt * ub[c0 + i];
            y[i] = 0.0f;
          }
          for (int64_t n = 0; n < dstate; ++n) {
            const float* Bn = Bb + n * B.stride(2) + c0 * sBl;
            for (int64_t i = 0; i < len; ++i) {
              dA[n * CHUNK + i] = exp2_approx(dtv[i] * A2[n]);
              dBu[n * CHUNK + i] = du[i] * Bn[i * sBl];
            }
          }
          for (int64_t n = 0; n < dstate; ++n) {
            const float* Cn = Cb + n * C.stride(2) + c0 * sCl;
            float hn = h[n];
            for (int64_t i = 0; i < len; ++i) {
              hn = dA[n * CHUNK + i] * hn + dBu[n * CHUNK + i];
              y[i] += hn * Cn[i * sCl];
            }
            h[n] = hn;
          }
          for (int64_t i = 0; i < len; ++i) {
            const float uu = ub[c0 + i];
            float v = y[i] + dskip * uu;
            if (zb) {
              const float zz = zb[c0 + i];
              v *= zz / (1.0f + exp2_approx(-zz * LOG2E));
            }
            ob[c0 + i] = v;
          }
        }
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
