/* metarun's fused CPU kernels for NCHW-contiguous batch-norm (batch statistics, no running
 * statistics) and 2x2 max-pooling: the passes second-order MAML differentiates twice.
 *
 * PyTorch runs these ops in NCHW on slow per-plane paths, and writes the double backward of
 * batch-norm as some thirty whole-tensor operations. Here each is one or two sweeps per
 * channel, the second over data the first left in cache. Plain C with no torch headers, so it
 * compiles in about a second (metarun/execution/kernels/__init__.py builds it on first use and caches
 * the library). The kernels are written once, in cpu_kernels_body.h, for float and double.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define T float
#define NAME(name) name##_f32
#include "cpu_kernels_body.h"
#undef T
#undef NAME

#define T double
#define NAME(name) name##_f64
#include "cpu_kernels_body.h"
#undef T
#undef NAME

int metarun_kernels_version(void) { return 2; }
