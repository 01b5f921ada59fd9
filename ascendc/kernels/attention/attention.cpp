// Exports the attention kernels of this ISA library.
#include "kernels/attention/attention_plan.h"
#include "kernels/attention/cache_ops.h"
#include "kernels/attention/paged_launch.h"

extern "C" const OmniAttentionKernels* omni_attention_kernels(void) {
  namespace k = omni_kernels;
  static const OmniAttentionKernels t = {&k::paged_attention, &k::reshape_and_cache, &k::mla_cache,
                                         &k::plan_decode, &k::dense_attention_workspace, &k::dense_attention};
  return &t;
}
