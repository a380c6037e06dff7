// Function multi-versioning for the CPU hot loops: each marked function is compiled for
// x86-64-v3 (AVX2, FMA) and for the baseline ISA, and the loader picks one per machine by
// its features, so one wheel is fast on current x86 CPUs and still runs on old ones.
// ("arch=haswell" would be picked by CPU model, i.e. never on AMD.) Elsewhere it is empty.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CHAMELEON_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CHAMELEON_CLONES
#endif
