// Paged attention over the KV cache (per layer, K and V each laid out
// [num_blocks][block_size][num_kv_heads][head_dim] bf16): decode split over
// the context with a reduction (flash-decoding), and causal prefill over
// tiles of consecutive rows of one sequence. Softmax is online, in f32.
//
// Work split, shared by both kernels: a warp owns a (query row, query
// head) pair; its lanes hold head dimensions d = lane + 32 i (i < 8, so
// head_dim <= 256) of the query and of the running output in registers,
// and a key's score is one warp sum. Query heads are taken in chunks of
// ATT_HEADS per warp, so a block reads each K/V byte once per chunk
// instead of once per head.

#define ATT_THREADS 128
#define ATT_WARPS (ATT_THREADS / WEIR_WARP)
#define ATT_DIMS 8      // head dimensions per lane: head_dim <= 256
#define ATT_HEADS 4     // query heads a warp carries at once
#define ATT_CHUNK 32    // keys staged in shared memory per round (prefill)

// Address of the K or V row of `pos` in a sequence's block table.
__device__ __forceinline__ long long att_row(const u32* table, int pos, int block_size,
                                              int num_kv_heads, int head_dim, int kv_head) {
    const u32 block = table[pos / block_size];
    const long long slot = (long long)block * block_size + pos % block_size;
    return (slot * num_kv_heads + kv_head) * head_dim;
}

// One warp's running softmax state for ATT_HEADS query heads.
struct AttState {
    float m[ATT_HEADS];
    float l[ATT_HEADS];
    float acc[ATT_HEADS][ATT_DIMS];
};

__device__ __forceinline__ void att_init(AttState& s) {
#pragma unroll
    for (int h = 0; h < ATT_HEADS; ++h) {
        s.m[h] = WEIR_NEG_INF;
        s.l[h] = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_DIMS; ++i) s.acc[h][i] = 0.0f;
    }
}

// Folds one key/value (this lane's dimensions in k, v) into head h's state.
__device__ __forceinline__ void att_step(AttState& s, int h, float score, const float* v) {
    const float m = fmaxf(s.m[h], score);
    const float old = __expf(s.m[h] - m);  // 0 when the state was empty
    const float p = __expf(score - m);
    s.l[h] = s.l[h] * old + p;
#pragma unroll
    for (int i = 0; i < ATT_DIMS; ++i) s.acc[h][i] = s.acc[h][i] * old + p * v[i];
    s.m[h] = m;
}

// This lane's dimensions of ATT_HEADS query heads starting at `head`
// (scaled; zeros past the group or the head width, or when `!active`).
__device__ __forceinline__ void att_load_q(float (&qv)[ATT_HEADS][ATT_DIMS], const bf16_t* q_row,
                                           int head, int heads_left, int head_dim, float scale,
                                           bool active) {
    const int lane = threadIdx.x % WEIR_WARP;
#pragma unroll
    for (int h = 0; h < ATT_HEADS; ++h) {
#pragma unroll
        for (int i = 0; i < ATT_DIMS; ++i) {
            const int d = lane + WEIR_WARP * i;
            qv[h][i] = (active && h < heads_left && d < head_dim)
                           ? bf16_to_f32(q_row[(long long)(head + h) * head_dim + d]) * scale
                           : 0.0f;
        }
    }
}

// Folds one key and value (bf16 rows, this lane's dimensions) into the
// state of every carried head: one warp sum per head.
__device__ __forceinline__ void att_fold_key(AttState& s, const float (&qv)[ATT_HEADS][ATT_DIMS],
                                             const bf16_t* k, const bf16_t* v, int head_dim,
                                             int heads_left) {
    const int lane = threadIdx.x % WEIR_WARP;
    float kv[ATT_DIMS], vv[ATT_DIMS];
#pragma unroll
    for (int i = 0; i < ATT_DIMS; ++i) {
        const int d = lane + WEIR_WARP * i;
        kv[i] = d < head_dim ? bf16_to_f32(k[d]) : 0.0f;
        vv[i] = d < head_dim ? bf16_to_f32(v[d]) : 0.0f;
    }
#pragma unroll
    for (int h = 0; h < ATT_HEADS; ++h) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_DIMS; ++i) dot += qv[h][i] * kv[i];
        dot = warp_sum(dot);
        if (h < heads_left) att_step(s, h, dot, vv);
    }
}

// Decode partials: grid (num_kv_heads, num_seqs, max_parts), block 128.
// Each warp takes every fourth position of the partition for one chunk of
// the group's query heads; the four warps' states are merged in shared
// memory and written as the partition's (max, sum, unnormalised output).
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_decode_partial(float* part_acc, float* part_max, float* part_sum, const bf16_t* q,
                             const bf16_t* k_cache, const bf16_t* v_cache, const u32* block_tables,
                             const u32* context_lens, int max_blocks_per_seq, int num_heads,
                             int num_kv_heads, int head_dim, int block_size, int partition_size,
                             int max_parts, float scale) {
    __shared__ float merge[ATT_WARPS][ATT_HEADS][ATT_DIMS * WEIR_WARP + 2];
    const int kv_head = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
    const int warp = threadIdx.x / WEIR_WARP, lane = threadIdx.x % WEIR_WARP;
    const int group = num_heads / num_kv_heads;
    const int ctx = (int)context_lens[seq];
    const int start = part * partition_size;
    const int end = min(start + partition_size, ctx);
    const u32* table = block_tables + (long long)seq * max_blocks_per_seq;
    for (int h0 = 0; h0 < group; h0 += ATT_HEADS) {
        AttState s;
        att_init(s);
        float qv[ATT_HEADS][ATT_DIMS];
        att_load_q(qv, q + (long long)seq * num_heads * head_dim, kv_head * group + h0,
                   group - h0, head_dim, scale, true);
        for (int pos = start + warp; pos < end; pos += ATT_WARPS) {
            const long long row = att_row(table, pos, block_size, num_kv_heads, head_dim, kv_head);
            att_fold_key(s, qv, k_cache + row, v_cache + row, head_dim, group - h0);
        }
        __syncthreads();
#pragma unroll
        for (int h = 0; h < ATT_HEADS; ++h) {
#pragma unroll
            for (int i = 0; i < ATT_DIMS; ++i) merge[warp][h][lane + WEIR_WARP * i] = s.acc[h][i];
            if (lane == 0) {
                merge[warp][h][ATT_DIMS * WEIR_WARP] = s.m[h];
                merge[warp][h][ATT_DIMS * WEIR_WARP + 1] = s.l[h];
            }
        }
        __syncthreads();
        for (int h = 0; h < ATT_HEADS && h0 + h < group; ++h) {
            float m = WEIR_NEG_INF;
            for (int w = 0; w < ATT_WARPS; ++w) m = fmaxf(m, merge[w][h][ATT_DIMS * WEIR_WARP]);
            const int head = kv_head * group + h0 + h;
            const long long at = ((long long)seq * num_heads + head) * max_parts + part;
            float l = 0.0f;
            for (int w = 0; w < ATT_WARPS; ++w) {
                const float mw = merge[w][h][ATT_DIMS * WEIR_WARP];
                if (mw != WEIR_NEG_INF) l += merge[w][h][ATT_DIMS * WEIR_WARP + 1] * __expf(mw - m);
            }
            for (int d = threadIdx.x; d < head_dim; d += ATT_THREADS) {
                float a = 0.0f;
                for (int w = 0; w < ATT_WARPS; ++w) {
                    const float mw = merge[w][h][ATT_DIMS * WEIR_WARP];
                    if (mw != WEIR_NEG_INF) a += merge[w][h][d] * __expf(mw - m);
                }
                part_acc[at * head_dim + d] = a;
            }
            if (threadIdx.x == 0) {
                part_max[at] = m;
                part_sum[at] = l;
            }
        }
    }
}

// Decode reduction: grid (num_heads, num_seqs), block 128. Combines the
// partitions covering the context: out = sum_p e^(m_p - M) acc_p /
// sum_p e^(m_p - M) sum_p.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_decode_reduce(bf16_t* out, const float* part_acc, const float* part_max,
                            const float* part_sum, const u32* context_lens, int num_heads,
                            int head_dim, int partition_size, int max_parts) {
    const int head = blockIdx.x, seq = blockIdx.y;
    const int ctx = (int)context_lens[seq];
    const int parts = min((ctx + partition_size - 1) / partition_size, max_parts);
    const long long base = ((long long)seq * num_heads + head) * max_parts;
    bf16_t* dst = out + ((long long)seq * num_heads + head) * head_dim;
    float m = WEIR_NEG_INF;
    for (int p = 0; p < parts; ++p) m = fmaxf(m, part_max[base + p]);
    float l = 0.0f;
    for (int p = 0; p < parts; ++p)
        if (part_max[base + p] != WEIR_NEG_INF) l += part_sum[base + p] * __expf(part_max[base + p] - m);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += ATT_THREADS) {
        float a = 0.0f;
        for (int p = 0; p < parts; ++p)
            if (part_max[base + p] != WEIR_NEG_INF)
                a += part_acc[(base + p) * head_dim + d] * __expf(part_max[base + p] - m);
        dst[d] = f32_to_bf16(a * inv);
    }
}

// Causal prefill over the paged cache: grid (num_tiles, num_kv_heads),
// block 128. The block's work is every (row of the tile, query head of the
// KV head's group) pair; each round a warp carries one row and up to
// ATT_HEADS heads, and the block streams the keys 0..=last row's position
// through shared memory in chunks of ATT_CHUNK (so four warps share each
// load), each warp skipping keys past its row's position.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_prefill(bf16_t* out, const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache,
                      const u32* block_tables, const u32* tile_seq, const u32* tile_row,
                      const u32* tile_len, const u32* tile_pos, int max_blocks_per_seq,
                      int num_heads, int num_kv_heads, int head_dim, int block_size, float scale) {
    __shared__ bf16_t ks[ATT_CHUNK][ATT_DIMS * WEIR_WARP];
    __shared__ bf16_t vs[ATT_CHUNK][ATT_DIMS * WEIR_WARP];
    const int tile = blockIdx.x, kv_head = blockIdx.y;
    const int warp = threadIdx.x / WEIR_WARP, lane = threadIdx.x % WEIR_WARP;
    const int group = num_heads / num_kv_heads;
    const int len = (int)tile_len[tile], first_pos = (int)tile_pos[tile];
    const int first_row = (int)tile_row[tile];
    const u32* table = block_tables + (long long)tile_seq[tile] * max_blocks_per_seq;
    const int head_chunks = (group + ATT_HEADS - 1) / ATT_HEADS;
    const int jobs = len * head_chunks;
    // Every warp runs the same number of rounds so that the block-wide
    // barriers of the key loop line up; idle warps carry no row.
    const int rounds = (jobs + ATT_WARPS - 1) / ATT_WARPS;
    for (int round = 0; round < rounds; ++round) {
        const int job = round * ATT_WARPS + warp;
        const bool active = job < jobs;
        const int r = active ? job / head_chunks : 0;
        const int h0 = active ? (job % head_chunks) * ATT_HEADS : 0;
        const int pos = first_pos + r;
        const long long qrow = (long long)(first_row + r) * num_heads;
        AttState s;
        att_init(s);
        float qv[ATT_HEADS][ATT_DIMS];
        att_load_q(qv, q + qrow * head_dim, kv_head * group + h0, group - h0, head_dim, scale,
                   active);
        // Keys this round needs: up to the last active row's position.
        const int last_job = min(jobs, (round + 1) * ATT_WARPS) - 1;
        const int keys = first_pos + last_job / head_chunks + 1;
        for (int base = 0; base < keys; base += ATT_CHUNK) {
            __syncthreads();
            const int n = min(ATT_CHUNK, keys - base);
            for (int e = threadIdx.x; e < n * head_dim; e += ATT_THREADS) {
                const int j = e / head_dim, d = e % head_dim;
                const long long row =
                    att_row(table, base + j, block_size, num_kv_heads, head_dim, kv_head);
                ks[j][d] = k_cache[row + d];
                vs[j][d] = v_cache[row + d];
            }
            __syncthreads();
            const int mine = active ? min(n, pos - base + 1) : 0;
            for (int j = 0; j < mine; ++j) att_fold_key(s, qv, ks[j], vs[j], head_dim, group - h0);
        }
        if (!active) continue;
#pragma unroll
        for (int h = 0; h < ATT_HEADS; ++h) {
            if (h0 + h >= group) continue;
            const int head = kv_head * group + h0 + h;
            const float inv = s.l[h] > 0.0f ? 1.0f / s.l[h] : 0.0f;
#pragma unroll
            for (int i = 0; i < ATT_DIMS; ++i) {
                const int d = lane + WEIR_WARP * i;
                if (d < head_dim) out[(qrow + head) * head_dim + d] = f32_to_bf16(s.acc[h][i] * inv);
            }
        }
    }
}
