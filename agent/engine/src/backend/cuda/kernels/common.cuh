// Shared by every Weir kernel source: the engine prepends this file to each
// `.cu` file before NVRTC compiles it. No system or toolkit header is
// included anywhere, so the agent needs only libnvrtc at run time (no CUDA
// toolkit headers on the node).
//
// bf16 values travel as raw 16-bit patterns (`bf16_t`); conversions are
// written out here: bf16 -> f32 is exact (a shift), f32 -> bf16 rounds to
// nearest even like `__float2bfloat16_rn` and keeps NaN a quiet NaN.

typedef unsigned short bf16_t;
typedef unsigned int u32;

#define WEIR_WARP 32
#define WEIR_NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float bf16_to_f32(bf16_t v) {
    return __uint_as_float(((u32)v) << 16);
}

__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    u32 bits = __float_as_uint(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (bf16_t)((bits >> 16) | 0x0040u);  // quiet NaN
    }
    u32 rounding = 0x7fffu + ((bits >> 16) & 1u);
    return (bf16_t)((bits + rounding) >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = WEIR_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = WEIR_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; every thread gets the result. `scratch` holds at least
// blockDim.x / 32 floats of shared memory; blockDim.x is a multiple of 32.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % WEIR_WARP, warp = threadIdx.x / WEIR_WARP;
    const int warps = blockDim.x / WEIR_WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Block-wide maximum, as `block_sum`.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % WEIR_WARP, warp = threadIdx.x / WEIR_WARP;
    const int warps = blockDim.x / WEIR_WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : WEIR_NEG_INF;
    return warp_max(v);
}
