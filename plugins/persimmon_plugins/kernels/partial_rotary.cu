// PersimmonPartialRotary: GPT-NeoX rotary (rotate_half = concat(-x2, x1)) on the first
// rotary_dims of each head, the remaining dims copied through; math in fp32.
//
// Layout: x, y: [tokens, heads, head_dim] contiguous, tokens = batch * seq.
// cos, sin: fp32 [tokens, rotary_dims] (the graph builds them once per step from the positions).
// One thread per output element. Argument order (TensorRT AOT plugins): input pointers, int32
// scalars, output pointers.
#include <cuda_fp16.h>

namespace {

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__half x) { return __half2float(x); }
template <typename T> __device__ inline T from_float(float x);
template <> __device__ inline float from_float<float>(float x) { return x; }
template <> __device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename T>
__device__ void partial_rotary(const T* x, const float* cos, const float* sin, int tokens, int heads, int head_dim,
                               int rotary_dims, T* y) {
    const long index = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long total = static_cast<long>(tokens) * heads * head_dim;
    if (index >= total) return;
    const int d = index % head_dim;
    if (d >= rotary_dims) {
        y[index] = x[index];
        return;
    }
    const long token = index / (static_cast<long>(heads) * head_dim);
    const int half = rotary_dims / 2;
    const float c = cos[token * rotary_dims + d];
    const float s = sin[token * rotary_dims + d];
    const float value = to_float(x[index]);
    // rotate_half(x)[d] = -x[d + half] for d < half, x[d - half] otherwise
    const float partner = d < half ? -to_float(x[index + half]) : to_float(x[index - half]);
    y[index] = from_float<T>(value * c + partner * s);
}

}  // namespace

extern "C" __global__ void persimmon_partial_rotary_f16(const __half* x, const float* cos, const float* sin, int tokens,
                                                        int heads, int head_dim, int rotary_dims, __half* y) {
    partial_rotary(x, cos, sin, tokens, heads, head_dim, rotary_dims, y);
}

extern "C" __global__ void persimmon_partial_rotary_f32(const float* x, const float* cos, const float* sin, int tokens,
                                                        int heads, int head_dim, int rotary_dims, float* y) {
    partial_rotary(x, cos, sin, tokens, heads, head_dim, rotary_dims, y);
}
