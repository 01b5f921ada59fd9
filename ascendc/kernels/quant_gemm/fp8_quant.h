// Dynamic FP8 activation quantization (DeepSeek-V3's 1x128 groups), the first step of fp8_block_linear:
// per token and per 128 of K, scale = amax / 448 and code = e4m3fn(clamp(x / scale, +-448)), rounded to nearest
// even - the arithmetic of omniops.quant.formats.quantize_activation_fp8_group (torch's .to(float8_e4m3fn)).
#pragma once
#include "host/kernel_operator.h"
#include "omni/ops/quant_gemm.h"

namespace omni_kernels {
inline namespace OMNI_ISA_NS {
using namespace AscendC;

namespace fp8q {

// float -> float8_e4m3fn bits, round to nearest even. e4m3fn has no inf: |f| >= 480 (past the rounding range of
// the largest finite 448), inf and NaN give NaN (0x7F), keeping the sign bit.
OMNI_INLINE uint8_t E4M3FromFloat(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint8_t r;
  if (bits >= (1087u << 20)) {  // 480.0f
    r = 0x7F;
  } else if (bits < (121u << 23)) {  // below 2^-6, the smallest normal: subnormal codes
    // Adding 2^14 moves the value's bits to the bottom of the mantissa with the FPU's own RNE rounding.
    const uint32_t magic_bits = 141u << 23;
    float magic, sum;
    std::memcpy(&magic, &magic_bits, sizeof(magic));
    std::memcpy(&sum, &bits, sizeof(sum));
    sum += magic;
    uint32_t sum_bits;
    std::memcpy(&sum_bits, &sum, sizeof(sum_bits));
    r = static_cast<uint8_t>(sum_bits - magic_bits);
  } else {
    // Rebias the exponent (127 -> 7) and round the 23-bit mantissa to 3 bits, ties to even.
    const uint32_t odd = (bits >> 20) & 1u;
    bits += (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFFu + odd;
    r = static_cast<uint8_t>(bits >> 20);
  }
  return static_cast<uint8_t>(r | (sign >> 24));
}

template <typename T>
void QuantFp8Launch(const OmniQuantFp8Args* a, const OmniRuntime* rt) {
  const int64_t KB = (a->K + 127) / 128;
  auto body = [a, KB]() {
    int64_t m0, m1;
    BlockRange(a->M, GetBlockIdx(), GetBlockNum(), &m0, &m1);
    for (int64_t m = m0; m < m1; ++m) {
      const T* src = static_cast<const T*>(a->x) + m * a->x_stride;
      uint8_t* q = a->out + m * a->K;
      for (int64_t kb = 0; kb < KB; ++kb) {
        const int64_t k0 = kb * 128, k1 = a->K < k0 + 128 ? a->K : k0 + 128;
        float amax = 0.0f;
        for (int64_t k = k0; k < k1; ++k) {
          const float v = __builtin_fabsf(ToFloat(src[k]));
          amax = v > amax ? v : amax;
        }
        const float s = amax / 448.0f;
        const float d = s == 0.0f ? 1.0f : s;
        for (int64_t k = k0; k < k1; ++k) {
          float v = ToFloat(src[k]) / d;
          v = v < -448.0f ? -448.0f : (v > 448.0f ? 448.0f : v);
          q[k] = E4M3FromFloat(v);
        }
        a->scale[m * KB + kb] = s;
      }
    }
  };
  LaunchBlocks(BlocksFor(a->M, a->K * static_cast<int64_t>(sizeof(T) + 1), rt), rt, body);
}

}  // namespace fp8q

inline void quantize_fp8_group(const OmniQuantFp8Args* a, const OmniRuntime* rt) {
  if (a->M <= 0 || a->K <= 0) return;
  OMNI_DISPATCH_FLOAT(a->dtype, T, fp8q::QuantFp8Launch<T>(a, rt));
}

}  // namespace OMNI_ISA_NS
}  // namespace omni_kernels
