// A kernel thread pool in which the calling thread works too and never waits for a thread that has not started.
//
// Why: on a small machine shared with other processes (an HTTP front end, a load generator), an OpenMP region
// waits at its barrier for every thread of the team; one thread descheduled for a scheduler slice stalls the
// whole region, and a decode step runs ~100 regions (measured on 2 cores: omni-serve at concurrency 16 fell from
// ~300 to 60-80 tokens/s with 2 OpenMP threads). Here blocks are claimed from a shared counter by the caller and
// by helper threads as they arrive: a helper that is asleep or descheduled simply takes no block, so a launch is
// never slower than the caller alone plus the blocks a helper already holds.
#pragma once
#include <cstdint>

#include "omni/kernel_abi.h"

namespace omni {

// Runs kernel blocks on the calling thread plus `threads - 1` helpers; threads == 1 stops the helpers (the runtime
// then launches on torch's pool). std::invalid_argument outside [1, 1024].
void SetCoopThreads(int threads);
int CoopThreads();
// The launch function of the pool (an OmniLaunchFn).
void CoopLaunch(int64_t block_num, void* ctx, OmniBlockFn fn);

}  // namespace omni
