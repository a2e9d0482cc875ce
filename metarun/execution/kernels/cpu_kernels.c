/* metarun's fused CPU kernels for batch-norm (batch statistics, no running statistics), 2x2
 * max-pooling and the two as one op: NCHW for the passes second-order MAML differentiates twice,
 * channels-last too for the pool and the fused op (the query passes).
 *
 * PyTorch runs these ops in NCHW on slow per-plane paths, and writes the double backward of
 * batch-norm as some thirty whole-tensor operations. Here each is one or two sweeps per
 * channel, the second over data the first left in cache. Plain C with no torch headers, so it
 * compiles quickly (metarun/execution/kernels/__init__.py builds it on first use and caches
 * the library). The kernels are written once, in cpu_kernels_body.h, for float and double.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

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

int metarun_kernels_version(void) { return 4; }
