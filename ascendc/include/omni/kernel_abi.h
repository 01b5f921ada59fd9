// The C ABI between the pybind11 module (omniops._C, links torch) and the per-ISA kernel libraries
// (libomni_kernels_<isa>.so, torch-free). One library is built per ISA level with its own compiler flags and
// loaded with dlopen(RTLD_LOCAL), so inline/template code compiled for AVX-512 can never be picked by the
// linker for the AVX2 path (the ODR trap of mixing -m flags in one shared object).
//
// Each op family has a header in omni/ops/<family>.h with its argument structs and a table of kernel entry
// points, exported by every kernel library as `const Omni<Family>Kernels* omni_<family>_kernels(void)`.
// Argument structs carry raw pointers plus the sizes the kernel may touch; the bindings have already checked
// dtype, device, shapes, strides and index ranges against them, and kernels trust them.
#pragma once
#include <stdint.h>

#define OMNI_KERNEL_ABI_VERSION 5

// The Unified Buffer (local memory) per AI core, 192 KiB as on Ascend 910B: kernels tile into it, and the
// bindings reject sizes whose scratch would not fit (see e.g. omni_moe_route_ub_bytes).
#define OMNI_UB_BYTES (192 * 1024)

#if defined(__GNUC__)
#define OMNI_EXPORT __attribute__((visibility("default")))
#else
#define OMNI_EXPORT
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { OMNI_F32 = 0, OMNI_F16 = 1, OMNI_BF16 = 2 } OmniDType;

// A grid launch: run fn(ctx, i) for every i in [0, block_num), possibly in parallel. Provided by the host
// runtime in the bindings (torch's intra-op thread pool), so omniops shares threads with torch.
typedef void (*OmniBlockFn)(void* ctx, int64_t block_idx);
typedef void (*OmniLaunchFn)(int64_t block_num, void* ctx, OmniBlockFn fn);

typedef struct {
  OmniLaunchFn launch;
  int64_t num_cores;  // how many blocks can run at once (torch.get_num_threads())
} OmniRuntime;

// Every kernel library exports this; the bindings refuse a library built for another ABI version.
typedef struct {
  int32_t abi_version;
  const char* isa;  // "amx", "avx512", "avx2", "generic"
} OmniLibraryInfo;
OMNI_EXPORT const OmniLibraryInfo* omni_library_info(void);

#ifdef __cplusplus
}
#endif
