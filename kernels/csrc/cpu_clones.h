// LUMINA_CLONES: compile a function for AVX-512 and AVX2 as well as the baseline, one picked at load
// time by the CPU (GCC's function multi-versioning), so that its loops vectorise 16 / 8 / 4 wide.
// Nothing on other compilers and architectures (the baseline build alone).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LUMINA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LUMINA_CLONES
#endif
