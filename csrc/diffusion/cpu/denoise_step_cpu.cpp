// The CPU kernel of denoise_step (host entry: diffusion/denoise_step.cpp): one sampler update of
// the target rows and the re-anchoring of the source rows, in a single pass over (B, L, d), rows
// in parallel; the optional x0_prev and noise terms are compile-time switches.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "common/backends.h"
#include "common/cpu/cpu_dtype.h"
#include "common/cpu/vec_convert.h"
#include "diffusion/diffusion_params.h"

namespace moediffuseq::cpu {
namespace {

// One target row: out = a x_t + b x0_hat + wm m [+ c x0_prev] [+ s noise], float32 math,
// Vectorized<float>::size() values at a time.
template <typename T, bool kPrev, bool kNoise>
void update_row(const T* xt, const T* x0, const T* xp, const T* np, const float* mf, float a, float b, float c,
                float s, float wm, int64_t d, T* out) {
  using Vec = FloatVec;
  const Vec va(a), vb(b), vc(c), vs(s), vm(wm);
  int64_t i = 0;
  for (; i + Vec::size() <= d; i += Vec::size()) {
    Vec acc = at::vec::fmadd(va, load_float(xt + i), vm * Vec::loadu(mf + i));
    acc = at::vec::fmadd(vb, load_float(x0 + i), acc);
    if constexpr (kPrev) acc = at::vec::fmadd(vc, load_float(xp + i), acc);
    if constexpr (kNoise) acc = at::vec::fmadd(vs, load_float(np + i), acc);
    store_float(acc, out + i);
  }
  for (; i < d; ++i) {
    float v = a * static_cast<float>(xt[i]) + b * static_cast<float>(x0[i]) + wm * mf[i];
    if constexpr (kPrev) v += c * static_cast<float>(xp[i]);
    if constexpr (kNoise) v += s * static_cast<float>(np[i]);
    out[i] = static_cast<T>(v);
  }
}

void denoise_step(const DenoiseStepParams& p) {
  const int64_t L = p.seqlen, d = p.dim;
  dispatch_cpu_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto in = [](const void* ptr) { return static_cast<const T*>(ptr); };
    const T *xt = in(p.x_t), *x0 = in(p.x0_hat), *xp = in(p.x0_prev), *np = in(p.noise), *an = in(p.anchor);
    T* op = static_cast<T*>(p.out);
    std::vector<float> mf(d);
    to_float(in(p.m), mf.data(), d);
    auto row_fn = xp ? (np ? &update_row<T, true, true> : &update_row<T, true, false>)
                     : (np ? &update_row<T, false, true> : &update_row<T, false, false>);
    at::parallel_for(0, p.batch * L, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / L, base = row * d;
        if (!p.target_mask[row]) {
          std::copy(an + base, an + base + d, op + base);
          continue;
        }
        const float a = p.coef_xt[b], bb = p.coef_x0[b];
        const float c = xp ? p.coef_x0_prev[b] : 0.f, s = np ? p.coef_noise[b] : 0.f;
        row_fn(xt + base, x0 + base, xp ? xp + base : nullptr, np ? np + base : nullptr, mf.data(), a, bb, c, s,
               1.f - a - bb - c, d, op + base);
      }
    });
  });
}

const KernelsRegistration<ParamsKernel<DenoiseStepParams>> kRegistration(c10::DeviceType::CPU,
                                                                         {/*allow_half=*/false, &denoise_step});

}  // namespace
}  // namespace moediffuseq::cpu
