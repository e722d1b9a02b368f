// Element-wise and row-wise kernels of the decoder: embedding gather,
// RMSNorm (alone and fused with the residual add), rotate-half RoPE, the
// paged KV write, SwiGLU, residual adds, row gathers, casts and the
// benchmark fills. Layouts are row-major; bf16 values are raw bits (see
// common.cuh); every sum accumulates in f32. Out-of-range ids, slots and
// positions are skipped (or give zeros), never read or written.

// out[r][:] = table[ids[r]][:] as f32. grid (rows), block 256.
extern "C" __global__ void embed_rows(float* out, const bf16_t* table, const u32* ids, int rows,
                                      int hidden, int vocab) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const u32 id = ids[r];
    float* dst = out + (long long)r * hidden;
    if (id >= (u32)vocab) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = 0.0f;
        return;
    }
    const bf16_t* src = table + (long long)id * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = bf16_to_f32(src[i]);
}

// 1 / sqrt(mean(x^2) + eps) of one f32 row, for every thread of the block.
__device__ __forceinline__ float row_inv_rms(const float* x, int hidden, float eps, float* scratch) {
    float sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) sq += x[i] * x[i];
    sq = block_sum(sq, scratch);
    return 1.0f / sqrtf(sq / (float)hidden + eps);
}

// out = x * rsqrt(mean(x^2) + eps) * weight, bf16 out. grid (rows), block 256.
extern "C" __global__ void rms_norm(bf16_t* out, const float* x, const bf16_t* weight, int hidden,
                                    float eps) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * hidden;
    const float scale = row_inv_rms(x + base, hidden, eps, scratch);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[base + i] = f32_to_bf16(x[base + i] * scale * bf16_to_f32(weight[i]));
}

// As rms_norm with an f32 output. grid (rows), block 256.
extern "C" __global__ void rms_norm_f32(float* out, const float* x, const bf16_t* weight,
                                        int hidden, float eps) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * hidden;
    const float scale = row_inv_rms(x + base, hidden, eps, scratch);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[base + i] = x[base + i] * scale * bf16_to_f32(weight[i]);
}

// residual += delta, then out = rms_norm(residual) (bf16). Each thread
// updates the elements it later normalises, so the row is read once from
// global memory for the sum and once for the output. grid (rows), block 256.
extern "C" __global__ void add_rms_norm(float* residual, const bf16_t* delta, bf16_t* out,
                                        const bf16_t* weight, int hidden, float eps) {
    __shared__ float scratch[32];
    const long long base = (long long)blockIdx.x * hidden;
    float* x = residual + base;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = x[i] + bf16_to_f32(delta[base + i]);
        x[i] = v;
        sq += v * v;
    }
    sq = block_sum(sq, scratch);
    const float scale = 1.0f / sqrtf(sq / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[base + i] = f32_to_bf16(x[i] * scale * bf16_to_f32(weight[i]));
}

// Rotate-half RoPE in place: for each head and i < half, with
// c = cos[pos][i], s = sin[pos][i]: (a, b) = (x[i], x[i + half]) becomes
// (a c - b s, b c + a s). Tables are [max_positions][half] f32.
// grid (rows), block 128.
extern "C" __global__ void rope_rotate(bf16_t* x, const float* cos_table, const float* sin_table,
                                       const u32* positions, int rows, int num_heads, int head_dim,
                                       int max_positions) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const u32 pos = positions[r];
    if (pos >= (u32)max_positions) return;
    const int half = head_dim / 2;
    const float* c = cos_table + (long long)pos * half;
    const float* s = sin_table + (long long)pos * half;
    bf16_t* row = x + (long long)r * num_heads * head_dim;
    for (int p = threadIdx.x; p < num_heads * half; p += blockDim.x) {
        const int h = p / half, i = p % half;
        bf16_t* head = row + h * head_dim;
        const float a = bf16_to_f32(head[i]), b = bf16_to_f32(head[i + half]);
        head[i] = f32_to_bf16(a * c[i] - b * s[i]);
        head[i + half] = f32_to_bf16(b * c[i] + a * s[i]);
    }
}

// Copies row r of k and v (width = kv_heads * head_dim) into slot slots[r]
// of the layer's caches, 16 bytes at a time when the width allows.
// grid (rows), block 128.
extern "C" __global__ void write_kv(bf16_t* k_cache, bf16_t* v_cache, const bf16_t* k,
                                    const bf16_t* v, const u32* slots, int rows, int width,
                                    u32 num_slots) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const u32 slot = slots[r];
    if (slot >= num_slots) return;
    const long long src = (long long)r * width, dst = (long long)slot * width;
    if (width % 8 == 0) {
        const uint4* ks = reinterpret_cast<const uint4*>(k + src);
        const uint4* vs = reinterpret_cast<const uint4*>(v + src);
        uint4* kd = reinterpret_cast<uint4*>(k_cache + dst);
        uint4* vd = reinterpret_cast<uint4*>(v_cache + dst);
        for (int i = threadIdx.x; i < width / 8; i += blockDim.x) {
            kd[i] = ks[i];
            vd[i] = vs[i];
        }
    } else {
        for (int i = threadIdx.x; i < width; i += blockDim.x) {
            k_cache[dst + i] = k[src + i];
            v_cache[dst + i] = v[src + i];
        }
    }
}

#define WEIR_GRID_STRIDE(i, n)                                                   \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

// out = silu(gate) * up, silu(g) = g / (1 + exp(-g)). Grid-stride, block 256.
extern "C" __global__ void silu_mul(bf16_t* out, const bf16_t* gate, const bf16_t* up,
                                    long long n) {
    WEIR_GRID_STRIDE(i, n) {
        const float g = bf16_to_f32(gate[i]);
        out[i] = f32_to_bf16(g / (1.0f + expf(-g)) * bf16_to_f32(up[i]));
    }
}

// x += y (bf16 y). Grid-stride, block 256.
extern "C" __global__ void add_bf16_to_f32(float* x, const bf16_t* y, long long n) {
    WEIR_GRID_STRIDE(i, n) { x[i] += bf16_to_f32(y[i]); }
}

// x += y. Grid-stride, block 256.
extern "C" __global__ void add_f32(float* x, const float* y, long long n) {
    WEIR_GRID_STRIDE(i, n) { x[i] += y[i]; }
}

// out[i][:] = x[rows[i]][:] (zeros for a row outside x). grid (n_rows), block 256.
extern "C" __global__ void gather_rows_f32(float* out, const float* x, const u32* rows, int n_rows,
                                           int cols, int x_rows) {
    const int i = blockIdx.x;
    if (i >= n_rows) return;
    const u32 r = rows[i];
    float* dst = out + (long long)i * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        dst[c] = r < (u32)x_rows ? x[(long long)r * cols + c] : 0.0f;
}

// out = bf16(x). Grid-stride, block 256.
extern "C" __global__ void cast_f32_to_bf16(bf16_t* out, const float* x, long long n) {
    WEIR_GRID_STRIDE(i, n) { out[i] = f32_to_bf16(x[i]); }
}

// splitmix64: a counter-based hash, so every element is independent of the
// launch geometry.
__device__ __forceinline__ unsigned long long ew_mix(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// N(mean, std) values from (seed, index) by Box-Muller, for benchmark
// weights. Grid-stride, block 256.
extern "C" __global__ void fill_normal_bf16(bf16_t* out, long long n, unsigned long long seed,
                                            float mean, float std) {
    WEIR_GRID_STRIDE(i, n) {
        const unsigned long long h = ew_mix(seed ^ ew_mix((unsigned long long)i));
        // Two 24-bit uniforms; u1 in (0, 1] keeps the logarithm finite.
        const float u1 = ((float)(h >> 40) + 1.0f) * (1.0f / 16777216.0f);
        const float u2 = (float)((h >> 16) & 0xffffffull) * (1.0f / 16777216.0f);
        const float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
        out[i] = f32_to_bf16(mean + std * z);
    }
}

// out = value. Grid-stride, block 256.
extern "C" __global__ void fill_f32(float* out, long long n, float value) {
    WEIR_GRID_STRIDE(i, n) { out[i] = value; }
}
