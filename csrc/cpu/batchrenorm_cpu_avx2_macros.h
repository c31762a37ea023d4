// batchrenorm_cpu_avx2_macros.h: the feature macros that -mavx2 -mfma -mf16c would define, for
// the files that get those instructions from `#pragma GCC target` instead (the extension is
// built without -m flags, so a wheel runs anywhere): the pragma does not define them, and the
// headers test them (sleef.h declares its 256-bit functions under __AVX__). Included after the
// pragma and before any other header; includes nothing itself.
#pragma once

#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
