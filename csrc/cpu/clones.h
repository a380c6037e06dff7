// Function multi-versioning for the CPU hot loops: each marked function is compiled for
// Haswell (AVX2 + FMA) and for the baseline ISA, and the loader picks one per machine, so one wheel is fast
// on current x86 CPUs and still runs on old ones. Elsewhere the attribute is empty.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CHAMELEON_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define CHAMELEON_CLONES
#endif
