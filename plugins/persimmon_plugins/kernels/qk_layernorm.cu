// PersimmonQKLayerNorm: per-head LayerNorm of q and k over head_dim, one shared weight/bias pair
// per tensor, statistics in fp32 whatever the storage type.
//
// Layout: query, key, outputs: [rows, head_dim] contiguous, rows = batch * seq * heads.
// weights, biases: fp32 [head_dim]. One warp normalises one row; rows of q come first
// (blockIdx/warp index < rows), then rows of k.
// Argument order follows TensorRT's ahead-of-time plugin convention: input pointers, int32
// scalars, output pointers. Scalars are int32 only there, so epsilon arrives as its float bits.
#include <cuda_fp16.h>

namespace {

constexpr int kWarp = 32;
constexpr int kMaxPerLane = 8;  // head_dim <= 256

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__half x) { return __half2float(x); }
template <typename T> __device__ inline T from_float(float x);
template <> __device__ inline float from_float<float>(float x) { return x; }
template <> __device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }

__device__ inline float warp_sum(float value) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

template <typename T>
__device__ void normalize_row(const T* x, const float* weight, const float* bias, T* y, int head_dim, float eps) {
    const int lane = threadIdx.x % kWarp;
    float values[kMaxPerLane];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
        const int d = lane + i * kWarp;
        values[i] = d < head_dim ? to_float(x[d]) : 0.f;
        sum += values[i];
    }
    const float mean = warp_sum(sum) / head_dim;
    float squares = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
        const int d = lane + i * kWarp;
        const float centered = d < head_dim ? values[i] - mean : 0.f;
        squares += centered * centered;
    }
    const float inv_std = rsqrtf(warp_sum(squares) / head_dim + eps);  // two-pass variance, as torch
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
        const int d = lane + i * kWarp;
        if (d < head_dim) y[d] = from_float<T>((values[i] - mean) * inv_std * weight[d] + bias[d]);
    }
}

template <typename T>
__device__ void qk_layernorm(const T* query, const T* key, const float* q_weight, const float* q_bias,
                             const float* k_weight, const float* k_bias, int rows, int head_dim, int eps_bits,
                             T* query_out, T* key_out) {
    const float eps = __int_as_float(eps_bits);
    const int warps_per_block = blockDim.x / kWarp;
    const int row = blockIdx.x * warps_per_block + threadIdx.x / kWarp;
    if (row < rows) {
        const long offset = static_cast<long>(row) * head_dim;
        normalize_row(query + offset, q_weight, q_bias, query_out + offset, head_dim, eps);
    } else if (row < 2 * rows) {
        const long offset = static_cast<long>(row - rows) * head_dim;
        normalize_row(key + offset, k_weight, k_bias, key_out + offset, head_dim, eps);
    }
}

}  // namespace

extern "C" __global__ void persimmon_qk_layernorm_f16(const __half* query, const __half* key, const float* q_weight,
                                                      const float* q_bias, const float* k_weight, const float* k_bias,
                                                      int rows, int head_dim, int eps_bits, __half* query_out,
                                                      __half* key_out) {
    qk_layernorm(query, key, q_weight, q_bias, k_weight, k_bias, rows, head_dim, eps_bits, query_out, key_out);
}

extern "C" __global__ void persimmon_qk_layernorm_f32(const float* query, const float* key, const float* q_weight,
                                                      const float* q_bias, const float* k_weight, const float* k_bias,
                                                      int rows, int head_dim, int eps_bits, float* query_out,
                                                      float* key_out) {
    qk_layernorm(query, key, q_weight, q_bias, k_weight, k_bias, rows, head_dim, eps_bits, query_out, key_out);
}
