// Exports the MoE kernels of this ISA library. Tiled (AMX) weights and fp32 panels are taken only by a library
// compiled with the instructions they need; weight_layouts tells the bindings which layouts that is. Panels
// run in the row-major entry points (fused_moe.h, moe_ops.h), which read w_layout themselves.
#include "kernels/moe/fused_moe.h"
#include "kernels/moe/moe_ops.h"
#include "kernels/moe/moe_tiles.h"

namespace {
namespace m = omni_kernels::moe;

void FusedMoe(const OmniFusedMoeArgs* a, const OmniRuntime* rt) {
#if defined(OMNI_HAVE_TILE_LAYOUT)
  if (a->w_layout == OMNI_W_TILES_BF16) {
    if (a->tokens > 0) m::FusedMoeTilesRun(*a, rt);
    return;
  }
#endif
  m::fused_moe(a, rt);
}

void GroupedGemm(const OmniGroupedGemmArgs* a, const OmniRuntime* rt) {
#if defined(OMNI_HAVE_TILE_LAYOUT)
  if (a->w_layout == OMNI_W_TILES_BF16) {
    if (a->rows > 0 && a->n_dim > 0) m::GroupedGemmTilesRun(*a, rt);
    return;
  }
#endif
  m::grouped_gemm(a, rt);
}

int64_t GroupedGemmWorkspace(const OmniGroupedGemmArgs* a) {
#if defined(OMNI_HAVE_TILE_LAYOUT)
  if (a->w_layout == OMNI_W_TILES_BF16) return m::GroupedGemmTilesWorkspace(*a);
#endif
  return 0;
}

constexpr uint32_t kLayouts = (1u << OMNI_W_ROWS) | (omni_kernels::amx::kHaveTiles ? 1u << OMNI_W_TILES_BF16 : 0u) |
                              (m::kHavePanels ? 1u << OMNI_W_PANELS_F32 : 0u);
}  // namespace

extern "C" const OmniMoeKernels* omni_moe_kernels(void) {
  static const OmniMoeKernels t = {&m::moe_route, &m::moe_dispatch, &GroupedGemm,      &m::moe_combine,
                                   &m::fused_moe_workspace, &FusedMoe, &GroupedGemmWorkspace, kLayouts};
  return &t;
}
