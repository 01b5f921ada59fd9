// Exports the quantized GEMM kernels of this ISA library. Tiled (AMX-INT8) W8A8 weights are taken only by a
// library compiled with the tile instructions; weight_layouts tells the bindings.
#include "kernels/quant_gemm/dequant_gemm.h"
#include "kernels/quant_gemm/fp8_quant.h"
#include "kernels/quant_gemm/w8a8_gemm.h"
#include "kernels/quant_gemm/w8a8_tiles.h"

namespace {
namespace k = omni_kernels;

void W8A8(const OmniW8A8Args* a, const OmniRuntime* rt) {
#if defined(OMNI_HAVE_TILE_LAYOUT)
  if (a->w_layout == OMNI_W_TILES_I8) return k::w8a8_tiles::w8a8_gemm_tiles(a, rt);
#endif
  k::w8a8_gemm(a, rt);
}

int64_t W8A8Workspace(const OmniW8A8Args* a) {
  return a->w_layout == OMNI_W_TILES_I8 ? k::w8a8_tiles::Workspace(*a) : 0;
}

#if defined(OMNI_HAVE_TILE_LAYOUT)
#if defined(OMNI_HAVE_AMX_TILES)
constexpr const char* kI8Path = "amx-int8 (tiled weights), " OMNI_QGEMM_I8_PATH " (row-major)";
#else
constexpr const char* kI8Path = "avx512-vnni vpdpbusd (tiled weights), " OMNI_QGEMM_I8_PATH " (row-major)";
#endif
constexpr uint32_t kLayouts = 1u | (1u << OMNI_W_TILES_I8);
#else
constexpr const char* kI8Path = OMNI_QGEMM_I8_PATH;
constexpr uint32_t kLayouts = 1u;
#endif
}  // namespace

extern "C" const OmniQuantGemmKernels* omni_quant_gemm_kernels(void) {
  static const OmniQuantGemmKernels t = {&W8A8, &k::w4a16_gemm, &k::fp8_block_gemm, &k::quantize_per_token_int8,
                                         kI8Path, &W8A8Workspace, kLayouts, &k::quantize_fp8_group};
  return &t;
}
