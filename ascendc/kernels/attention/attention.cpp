// Exports the attention kernels of this ISA library.
#include "kernels/attention/cache_ops.h"
#include "kernels/attention/paged_attention.h"

extern "C" const OmniAttentionKernels* omni_attention_kernels(void) {
  static const OmniAttentionKernels t = {&omni_kernels::paged_attention, &omni_kernels::reshape_and_cache,
                                         &omni_kernels::mla_cache};
  return &t;
}
