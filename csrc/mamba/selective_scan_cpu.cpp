// Selective scan on CPU: one sequential fp32 scan per (sequence, channel), OpenMP over the pairs,
// and its backward (selective_scan_bwd_cpu, below the forward).
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
#include <memory>
#include <algorithm>
#include <optional>
#include <tuple>
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

// ---- Backward ---------------------------------------------------------------------------------
// Per (batch, channel): a forward pass keeps the state at every CHUNK boundary, then the chunks are
// walked last to first, each recomputing its CHUNK x N states and decays from its checkpoint and
// running the reverse recurrence of the state gradient g through them (h_{-1} = 0):
//   g_t = dy_t C_t + exp(dt_{t+1} A) g_{t+1}  (g_{L-1} also gets dlast),  dy = dout silu(z)
//   dB_t = g_t dt_t u_t, dC_t = dy_t h_t, dA += dt_t g_t h_{t-1} exp(dt_t A), du_t = dt_t (g_t . B_t) + D dy_t,
//   ddt_t = u_t (g_t . B_t) + sum_n g_t h_{t-1} exp(dt_t A) A,  ddelta_t = ddt_t sigmoid(delta_t + bias)
//   under softplus (exactly 1.0f in fp32 above 20, torch's pass-through).
// Scratch per thread: N x (L / CHUNK + 2 CHUNK) floats. Deterministic whatever the thread count:
// every sum runs in one fixed order. Per-(batch, channel) sums over tokens go to [B, D(, N)]
// partials, then are summed over the batch in batch order; grouped B/C gradients are summed over
// fixed blocks of BLOCK_D channels of a group (one task per block, its channels in order) into
// [B, blocks, L, N] partials (N / BLOCK_D times the size of u), then over a group's blocks in order.

constexpr int64_t BLOCK_D = 16;

inline float sigmoid(float x) { return 1.0f / (1.0f + exp2_approx(-x * LOG2E)); }

struct BwdChannel {
  const float *u, *delta, *z, *dout, *B, *C;  // u, delta, z, dout at (batch, channel); B, C at (batch, group)
  const float* dlast;                         // [N] at (batch, channel), stride s_dlast, or null
  float *du, *ddelta, *dz;                    // at (batch, channel)
  float *dA, *dB, *dC;  // sums over tokens (+=): dA [N]; dB, dC [L, N] block partials or [N] (token stride 0)
  int64_t sBl, sCl, sdBl, sdCl, s_dlast;
  float bias, dskip;
};

struct BwdScratch {
  std::vector<float> buf;
  float *dtv, *dsp, *dy, *y, *H, *E, *ckpt, *g, *A, *A2;
  BwdScratch(int64_t dstate, int64_t n_chunks) : buf(4 * CHUNK + (2 * CHUNK + n_chunks + 3) * dstate) {
    dtv = buf.data(), dsp = dtv + CHUNK, dy = dsp + CHUNK, y = dy + CHUNK, H = y + CHUNK;
    E = H + CHUNK * dstate, ckpt = E + CHUNK * dstate, g = ckpt + n_chunks * dstate, A = g + dstate;
    A2 = A + dstate;
  }
};

// Step sizes of tokens [0, n_tok) from delta there, and d dt / d delta.
void chunk_dt(const float* __restrict delta, float bias, bool delta_softplus, int64_t n_tok, float* __restrict dtv,
              float* __restrict dsp) {
  if (delta_softplus) {
#pragma omp simd
    for (int64_t i = 0; i < n_tok; ++i) {
      const float x = delta[i] + bias;
      dtv[i] = softplus(x);
      dsp[i] = sigmoid(x);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n_tok; ++i) dtv[i] = delta[i] + bias, dsp[i] = 1.0f;
  }
}

// Gradients of one channel over tokens [0, len); s.A, s.A2 hold A and A log2(e) of the channel.
// Returns the sums over tokens of dy u (dD) and ddelta (ddelta_bias).
std::pair<float, float> scan_channel_bwd(const BwdChannel& c, int64_t len, int64_t dstate, bool delta_softplus,
                                         BwdScratch& s) {
  const int64_t n_chunks = (len + CHUNK - 1) / CHUNK;
  float *__restrict dtv = s.dtv, *__restrict dsp = s.dsp, *__restrict dy = s.dy, *__restrict y = s.y;
  float *__restrict g = s.g, *__restrict ckpt = s.ckpt, *__restrict dA = c.dA;
  const float *__restrict A = s.A, *__restrict A2 = s.A2;
  for (int64_t n = 0; n < dstate; ++n) g[n] = 0.0f, dA[n] = 0.0f;  // g: the state h during this first pass
  for (int64_t k = 0; k < n_chunks; ++k) {
    for (int64_t n = 0; n < dstate; ++n) ckpt[k * dstate + n] = g[n];
    if (k + 1 == n_chunks) break;  // the last chunk's end state is not needed
    const int64_t c0 = k * CHUNK;
    chunk_dt(c.delta + c0, c.bias, delta_softplus, CHUNK, dtv, dsp);
    for (int64_t i = 0; i < CHUNK; ++i) {
      const float* __restrict Bi = c.B + (c0 + i) * c.sBl;
      const float dti = dtv[i], x = dti * c.u[c0 + i];
#pragma omp simd
      for (int64_t n = 0; n < dstate; ++n) g[n] = exp2_approx(dti * A2[n]) * g[n] + x * Bi[n];
    }
  }
  for (int64_t n = 0; n < dstate; ++n) g[n] = c.dlast ? c.dlast[n * c.s_dlast] : 0.0f;
  float dskip_sum = 0.0f, dbias_sum = 0.0f;
  for (int64_t k = n_chunks - 1; k >= 0; --k) {
    const int64_t c0 = k * CHUNK, n_tok = len - c0 < CHUNK ? len - c0 : CHUNK;
    const float *__restrict u = c.u + c0, *__restrict dout = c.dout + c0;
    chunk_dt(c.delta + c0, c.bias, delta_softplus, n_tok, dtv, dsp);
    // recompute the states h_t (H), the decays exp(dt_t A) (E) and y_t = C_t . h_t + D u_t
    const float* __restrict hp = ckpt + k * dstate;
    for (int64_t i = 0; i < n_tok; ++i) {
      const float* __restrict Bi = c.B + (c0 + i) * c.sBl;
      const float* __restrict Ci = c.C + (c0 + i) * c.sCl;
      float *__restrict Hi = s.H + i * dstate, *__restrict Ei = s.E + i * dstate;
      const float dti = dtv[i], x = dti * u[i];
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t n = 0; n < dstate; ++n) {
        Ei[n] = exp2_approx(dti * A2[n]);
        Hi[n] = Ei[n] * hp[n] + x * Bi[n];
        acc += Hi[n] * Ci[n];
      }
      y[i] = acc + c.dskip * u[i];
      hp = Hi;
    }
    if (c.z) {
      const float* __restrict z = c.z + c0;
      float* __restrict dz = c.dz + c0;
#pragma omp simd
      for (int64_t i = 0; i < n_tok; ++i) {
        const float sg = sigmoid(z[i]);
        dy[i] = dout[i] * z[i] * sg;
        dz[i] = dout[i] * y[i] * sg * (1.0f + z[i] * (1.0f - sg));
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n_tok; ++i) dy[i] = dout[i];
    }
    for (int64_t i = n_tok - 1; i >= 0; --i) {
      const int64_t t = c0 + i;
      const float* __restrict Bi = c.B + t * c.sBl;
      const float* __restrict Ci = c.C + t * c.sCl;
      const float* __restrict Hi = s.H + i * dstate;
      const float* __restrict Ei = s.E + i * dstate;
      hp = i ? Hi - dstate : ckpt + k * dstate;
      float *__restrict dBi = c.dB + t * c.sdBl, *__restrict dCi = c.dC + t * c.sdCl;
      const float dti = dtv[i], dyi = dy[i], x = dti * u[i];
      float sB = 0.0f, sA = 0.0f;
#pragma omp simd reduction(+ : sB, sA)
      for (int64_t n = 0; n < dstate; ++n) {
        const float gn = g[n] + dyi * Ci[n];
        const float q = gn * hp[n] * Ei[n];
        dBi[n] += gn * x;
        dCi[n] += dyi * Hi[n];
        dA[n] += q * dti;
        sB += gn * Bi[n];
        sA += q * A[n];
        g[n] = Ei[n] * gn;
      }
      const float dd = (u[i] * sB + sA) * dsp[i];
      c.du[t] = dti * sB + c.dskip * dyi;
      c.ddelta[t] = dd;
      dskip_sum += dyi * u[i];
      dbias_sum += dd;
    }
  }
  return {dskip_sum, dbias_sum};
}

void check_sizes(const at::Tensor& t, at::IntArrayRef sizes, const char* name) {
  TORCH_CHECK(t.sizes().equals(sizes), "selective_scan_bwd_cpu: ", name, " has shape ", t.sizes(), ", expected ",
              sizes);
}

// Grads (fp32, written in full) of the batched scan: du, ddelta, dz [Bt, D, L]; dA [D, N]; dB, dC
// like B, C: [D, N] per channel or token-major [Bt, G, L, N]; dD, ddelta_bias [D]. Inputs are the
// forward's (B, C in the same two forms), dout [Bt, D, L], dlast [Bt, D, N] or None.
void selective_scan_bwd_cpu(const at::Tensor& du, const at::Tensor& ddelta, const at::Tensor& dA,
                            const at::Tensor& dB, const at::Tensor& dC, const std::optional<at::Tensor>& dD,
                            const std::optional<at::Tensor>& dz, const std::optional<at::Tensor>& ddelta_bias,
                            const at::Tensor& dout, const std::optional<at::Tensor>& dlast, const at::Tensor& u,
                            const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                            const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                            const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  for (auto [t, name] : {std::pair{&du, "du"}, {&ddelta, "ddelta"}, {&dA, "dA"}, {&dB, "dB"}, {&dC, "dC"},
                         {&dout, "dout"}, {&u, "u"}, {&delta, "delta"}, {&A, "A"}, {&B, "B"}, {&C, "C"}})
    check_f32(*t, name);
  TORCH_CHECK(u.dim() == 3 && A.dim() == 2, "selective_scan_bwd_cpu: u must be 3-D and A 2-D");
  const int64_t bsz = u.size(0), dim = u.size(1), seqlen = u.size(2), dstate = A.size(1);
  check_sizes(A, {dim, dstate}, "A");
  check_sizes(dA, {dim, dstate}, "dA");
  TORCH_CHECK(D.has_value() == dD.has_value() && z.has_value() == dz.has_value() &&
                  delta_bias.has_value() == ddelta_bias.has_value(),
              "selective_scan_bwd_cpu: dD, dz, ddelta_bias must be given exactly when D, z, delta_bias are");
  for (auto [t, name] : {std::pair{&du, "du"}, {&ddelta, "ddelta"}, {&dout, "dout"}, {&delta, "delta"},
                         {&u, "u"}, {dz ? &*dz : &u, "dz"}, {z ? &*z : &u, "z"}}) {
    check_f32(*t, name);
    check_sizes(*t, {bsz, dim, seqlen}, name);
    TORCH_CHECK(t->numel() == 0 || seqlen <= 1 || t->stride(2) == 1, "selective_scan_bwd_cpu: ", name, " needs unit stride along L");
  }
  for (auto [t, name] : {std::pair{D ? &*D : nullptr, "D"}, {dD ? &*dD : nullptr, "dD"},
                         {delta_bias ? &*delta_bias : nullptr, "delta_bias"},
                         {ddelta_bias ? &*ddelta_bias : nullptr, "ddelta_bias"}}) {
    if (!t) continue;
    check_f32(*t, name);
    check_sizes(*t, {dim}, name);
  }
  if (dlast) {
    check_f32(*dlast, "dlast");
    check_sizes(*dlast, {bsz, dim, dstate}, "dlast");
  }
  // B/C and dB/dC: [D, N] per channel, or [Bt, G, L, N] grouped with G dividing D; unit stride along N
  // (an empty tensor keeps any strides through .contiguous(), and is never read)
  int64_t groups = 1;
  for (auto [M, dM, name] : {std::tuple{&B, &dB, "B"}, {&C, &dC, "C"}}) {
    if (M->dim() == 2) {
      check_sizes(*M, {dim, dstate}, name);
    } else {
      TORCH_CHECK(M->dim() == 4 && M->size(1) > 0 && dim % M->size(1) == 0, "selective_scan_bwd_cpu: ", name,
                  " must be [D, N] or [Bt, G, L, N] with G dividing D, got shape ", M->sizes());
      check_sizes(*M, {bsz, M->size(1), seqlen, dstate}, name);
      TORCH_CHECK(groups == 1 || groups == M->size(1), "selective_scan_bwd_cpu: B and C have different groups");
      groups = M->size(1);
    }
    check_sizes(*dM, M->sizes(), name[0] == 'B' ? "dB" : "dC");
    for (const at::Tensor* t : {M, dM})
      TORCH_CHECK(t->numel() == 0 || dstate <= 1 || t->stride(-1) == 1, "selective_scan_bwd_cpu: ", name, " and its grad need unit "
                  "stride along N");
  }
  const bool b_grouped = B.dim() == 4, c_grouped = C.dim() == 4;
  const int64_t dim_per_group = dim / groups, blocks_per_group = (dim_per_group + BLOCK_D - 1) / BLOCK_D;
  const int64_t n_blocks = groups * blocks_per_group, n_chunks = (seqlen + CHUNK - 1) / CHUNK;
  const int64_t block_elems = seqlen * dstate;

  // partial sums: per (batch, channel) [Bt, D, N] and [Bt, D]; per (batch, block) [Bt, blocks, L, N]
  const int64_t per_channel = bsz * dim * dstate;
  std::unique_ptr<float[]> pA(new float[per_channel]), pD(new float[bsz * dim]), pbias(new float[bsz * dim]);
  std::unique_ptr<float[]> pB(new float[b_grouped ? bsz * n_blocks * block_elems : per_channel]);
  std::unique_ptr<float[]> pC(new float[c_grouped ? bsz * n_blocks * block_elems : per_channel]);

  const float *pu = u.data_ptr<float>(), *pdt = delta.data_ptr<float>(), *pdo = dout.data_ptr<float>();
  const float *pz = opt_ptr(z, "z"), *pDs = opt_ptr(D, "D"), *pb = opt_ptr(delta_bias, "delta_bias");
  const float *pdl = opt_ptr(dlast, "dlast"), *pAin = A.data_ptr<float>();
  const float *pBin = B.data_ptr<float>(), *pCin = C.data_ptr<float>();
  float *pdu = du.data_ptr<float>(), *pddt = ddelta.data_ptr<float>(), *pdz = dz ? dz->data_ptr<float>() : nullptr;

#pragma omp parallel
  {
    BwdScratch s(dstate, n_chunks);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < bsz; ++b) {
      for (int64_t k = 0; k < n_blocks; ++k) {
        const int64_t grp = k / blocks_per_group, d0 = grp * dim_per_group + (k % blocks_per_group) * BLOCK_D;
        const int64_t d1 = d0 + BLOCK_D < (grp + 1) * dim_per_group ? d0 + BLOCK_D : (grp + 1) * dim_per_group;
        float* blkB = b_grouped ? pB.get() + (b * n_blocks + k) * block_elems : nullptr;
        float* blkC = c_grouped ? pC.get() + (b * n_blocks + k) * block_elems : nullptr;
        for (float* blk : {blkB, blkC})
          if (blk) std::fill(blk, blk + block_elems, 0.0f);
        for (int64_t d = d0; d < d1; ++d) {
          const int64_t bd = b * dim + d;
          float *sumB = pB.get() + bd * dstate, *sumC = pC.get() + bd * dstate;
          if (!b_grouped) std::fill(sumB, sumB + dstate, 0.0f);
          if (!c_grouped) std::fill(sumC, sumC + dstate, 0.0f);
          const int64_t ub = b * u.stride(0) + d * u.stride(1), db = b * delta.stride(0) + d * delta.stride(1);
          BwdChannel c{pu + ub,
                       pdt + db,
                       pz ? pz + b * z->stride(0) + d * z->stride(1) : nullptr,
                       pdo + b * dout.stride(0) + d * dout.stride(1),
                       b_grouped ? pBin + b * B.stride(0) + grp * B.stride(1) : pBin + d * B.stride(0),
                       c_grouped ? pCin + b * C.stride(0) + grp * C.stride(1) : pCin + d * C.stride(0),
                       pdl ? pdl + b * dlast->stride(0) + d * dlast->stride(1) : nullptr,
                       pdu + b * du.stride(0) + d * du.stride(1),
                       pddt + b * ddelta.stride(0) + d * ddelta.stride(1),
                       pdz ? pdz + b * dz->stride(0) + d * dz->stride(1) : nullptr,
                       pA.get() + bd * dstate,
                       b_grouped ? blkB : sumB,
                       c_grouped ? blkC : sumC,
                       b_grouped ? B.stride(2) : 0,
                       c_grouped ? C.stride(2) : 0,
                       b_grouped ? dstate : 0,
                       c_grouped ? dstate : 0,
                       pdl ? dlast->stride(2) : 0,
                       pb ? pb[d * delta_bias->stride(0)] : 0.0f,
                       pDs ? pDs[d * D->stride(0)] : 0.0f};
          for (int64_t n = 0; n < dstate; ++n) {
            s.A[n] = pAin[d * A.stride(0) + n * A.stride(1)];
            s.A2[n] = s.A[n] * LOG2E;
          }
          std::tie(pD[bd], pbias[bd]) = scan_channel_bwd(c, seqlen, dstate, delta_softplus, s);
        }
      }
    }
    // the implicit barrier above: every partial is written; sum them in fixed orders
#pragma omp for schedule(static)
    for (int64_t d = 0; d < dim; ++d) {
      for (int64_t n = 0; n < dstate; ++n) {
        float a = 0.0f, sb = 0.0f, sc = 0.0f;
        for (int64_t b = 0; b < bsz; ++b) {
          const int64_t i = (b * dim + d) * dstate + n;
          a += pA[i];
          sb += b_grouped ? 0.0f : pB[i];
          sc += c_grouped ? 0.0f : pC[i];
        }
        dA.data_ptr<float>()[d * dA.stride(0) + n * dA.stride(1)] = a;
        if (!b_grouped) dB.data_ptr<float>()[d * dB.stride(0) + n * dB.stride(1)] = sb;
        if (!c_grouped) dC.data_ptr<float>()[d * dC.stride(0) + n * dC.stride(1)] = sc;
      }
      float sd = 0.0f, sbias = 0.0f;
      for (int64_t b = 0; b < bsz; ++b) sd += pD[b * dim + d], sbias += pbias[b * dim + d];
      if (dD) dD->data_ptr<float>()[d * dD->stride(0)] = sd;
      if (ddelta_bias) ddelta_bias->data_ptr<float>()[d * ddelta_bias->stride(0)] = sbias;
    }
    for (auto [grouped, part, dM] : {std::tuple{b_grouped, pB.get(), &dB}, {c_grouped, pC.get(), &dC}}) {
      if (!grouped) continue;
      float* out = dM->data_ptr<float>();
#pragma omp for collapse(3) schedule(static)
      for (int64_t b = 0; b < bsz; ++b) {
        for (int64_t grp = 0; grp < groups; ++grp) {
          for (int64_t t = 0; t < seqlen; ++t) {
            float* __restrict o = out + b * dM->stride(0) + grp * dM->stride(1) + t * dM->stride(2);
            const float* __restrict p = part + ((b * n_blocks + grp * blocks_per_group) * seqlen + t) * dstate;
            for (int64_t n = 0; n < dstate; ++n) o[n] = 0.0f;
            for (int64_t k = 0; k < blocks_per_group; ++k) {
#pragma omp simd
              for (int64_t n = 0; n < dstate; ++n) o[n] += p[k * block_elems + n];
            }
          }
        }
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
  m.def(
      "selective_scan_bwd_cpu(Tensor(a!) du, Tensor(b!) ddelta, Tensor(c!) dA, Tensor(d!) dB, Tensor(e!) dC, "
      "Tensor(f!)? dD, Tensor(g!)? dz, Tensor(h!)? ddelta_bias, Tensor dout, Tensor? dlast, Tensor u, "
      "Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "bool delta_softplus) -> ()");
}

TORCH_LIBRARY_IMPL(ifk, CPU, m) {
  m.impl("selective_scan_cpu", &selective_scan_cpu);
  m.impl("selective_scan_bwd_cpu", &selective_scan_bwd_cpu);
}
