// Paged attention of the Weir CUDA backend over one layer's KV cache (K and
// V each [num_blocks][block_size][num_kv_heads][head_dim] bf16):
//   attention_decode_partial / attention_decode_reduce: one new row per
//     sequence, the context split into partitions (flash-decoding) and the
//     partitions merged by a second kernel;
//   attention_prefill: causal attention for tiles of up to 64 consecutive
//     rows of one sequence (prefill, chunked prefill, mixed batches).
// common.cuh is prepended by the engine. Plain f32 FMA (no tensor cores),
// online softmax in f32, exp(score - running max) as the CPU reference.
// K/V are staged in shared memory with cp.async (sm_80+); rows of keys
// past the context or of bad metadata are zero-filled, never read.
//
// Limits (the host checks them; the kernels return without writing when a
// launch violates them): num_heads % num_kv_heads == 0, group =
// num_heads / num_kv_heads in 1..=16, head_dim % 8 == 0 and 8..=256,
// block_size >= 1. Block-table entries must be < num_blocks (the kernels
// are not told num_blocks); tile_seq < num_seqs and tile rows inside q/out.

#define ATT_THREADS 128
#define ATT_MAX_GROUP 16
#define ATT_MAX_TILE 64

// Decode: two stages of (K chunk, V chunk), 8 KB each; chunk tokens *
// head_dim <= 4096, chunk <= 64 tokens; scores of a chunk [16][65] f32.
#define DEC_HALF_STAGE 8192
#define DEC_STAGE (2 * DEC_HALF_STAGE)
#define DEC_CHUNK_ELEMS 4096
#define DEC_MAX_CHUNK 64
#define DEC_S_STRIDE (DEC_MAX_CHUNK + 1)
#define DEC_SMEM (2 * DEC_STAGE + (ATT_MAX_GROUP * DEC_S_STRIDE + 3 * ATT_MAX_GROUP) * 4)

// Prefill shared memory: the largest head_dim class (64) needs 43520 bytes.
#define PF_SMEM 43520
#define ATT_SMEM (PF_SMEM > DEC_SMEM ? PF_SMEM : DEC_SMEM)

// ---------------------------------------------------------------- helpers

__device__ __forceinline__ float att_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float att_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ void att_unpack8(uint4 w, float* f) {
    f[0] = att_lo(w.x); f[1] = att_hi(w.x);
    f[2] = att_lo(w.y); f[3] = att_hi(w.y);
    f[4] = att_lo(w.z); f[5] = att_hi(w.z);
    f[6] = att_lo(w.w); f[7] = att_hi(w.w);
}

__device__ __forceinline__ u32 att_pack(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

__device__ __forceinline__ u32 att_word(uint4 w, int i) {
    return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w;
}

__device__ __forceinline__ int att_log2_exact(int x) {  // log2 if x is a power of two, else -1
    return (x > 0 && (x & (x - 1)) == 0) ? __ffs(x) - 1 : -1;
}

// 16-byte global -> shared copy; when !valid the 16 bytes are zero-filled
// and nothing is read.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
    const u32 dst = (u32)__cvta_generic_to_shared(smem_dst);
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
                 "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits for every committed group of this thread.
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// Waits for all but the most recently committed group of this thread.
__device__ __forceinline__ void cp_async_wait_one() {
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
}

__device__ __forceinline__ bool att_shape_ok(int num_heads, int num_kv_heads, int head_dim,
                                             int block_size) {
    if (num_kv_heads <= 0 || num_heads <= 0 || num_heads % num_kv_heads != 0) return false;
    const int group = num_heads / num_kv_heads;
    return group <= ATT_MAX_GROUP && (head_dim & 7) == 0 && head_dim >= 8 && head_dim <= 256 &&
           block_size >= 1;
}

// Where one sequence's rows of one KV head live.
struct KvView {
    const u32* bt;  // the sequence's block table
    int block_size, bs_log;  // bs_log: log2(block_size) or -1
    int num_kv_heads, kv_head, head_dim;
    int ppr, ppr_log;  // 16-byte pieces per row (head_dim / 8), its log2 or -1
};

__device__ __forceinline__ KvView att_view(const u32* bt, int block_size, int num_kv_heads,
                                           int kv_head, int head_dim) {
    KvView v;
    v.bt = bt;
    v.block_size = block_size;
    v.bs_log = att_log2_exact(block_size);
    v.num_kv_heads = num_kv_heads;
    v.kv_head = kv_head;
    v.head_dim = head_dim;
    v.ppr = head_dim >> 3;
    v.ppr_log = att_log2_exact(v.ppr);
    return v;
}

// Element offset of position t's row (this KV head) in the cache.
__device__ __forceinline__ long long att_row(const KvView& v, int t) {
    const int b = v.bs_log >= 0 ? t >> v.bs_log : t / v.block_size;
    const int o = v.bs_log >= 0 ? t & (v.block_size - 1) : t - b * v.block_size;
    const u32 block = v.bt[b];
    return (((long long)block * v.block_size + o) * v.num_kv_heads + v.kv_head) * v.head_dim;
}

// Issues cp.async copies of rows t0 .. t0+nrows-1 of `cache` into dst (row
// stride dst_stride elements); rows at t >= t_end are zero-filled.
__device__ __forceinline__ void att_load_rows(bf16_t* dst, int dst_stride, const bf16_t* cache,
                                              const KvView& v, int t0, int t_end, int nrows) {
    if (v.ppr_log >= 0) {
        const int part = threadIdx.x & (v.ppr - 1);
        const int step = ATT_THREADS >> v.ppr_log;
        for (int r = threadIdx.x >> v.ppr_log; r < nrows; r += step) {
            const int t = t0 + r;
            const bool ok = t < t_end;
            const long long off = ok ? att_row(v, t) + part * 8 : 0;
            cp_async16(dst + r * dst_stride + part * 8, cache + off, ok);
        }
    } else {
        const int total = nrows * v.ppr;
        for (int i = threadIdx.x; i < total; i += ATT_THREADS) {
            const int r = i / v.ppr, part = i - r * v.ppr;
            const int t = t0 + r;
            const bool ok = t < t_end;
            const long long off = ok ? att_row(v, t) + part * 8 : 0;
            cp_async16(dst + r * dst_stride + part * 8, cache + off, ok);
        }
    }
}

// ------------------------------------------------------------ decode core
//
// One block, 128 threads, one query row and the `group` query heads of one
// KV head, over context positions [t_begin, t_end). Split: a "unit" of DL
// lanes (DL = head_dim/8 rounded up to a power of two, 2..32) covers one
// key/value row, each lane 8 dimensions; a thread holds the query and the
// running output of HPU heads (1..4) for its 8 dimensions in registers.
// Units are arranged as nhg head groups x tsl token slots; K/V chunks are
// staged in shared memory (double-buffered cp.async), so each K/V byte is
// read from global memory once per block. Per chunk: scores (a unit's
// lanes sum their partial dots with xor shuffles) -> shared; per-head chunk
// max, exp and running sum by one warp per head -> shared; then every unit
// accumulates p * v for its heads and token slot. Token slots share the
// running max, so their outputs are summed at the end.

struct DecGeom {
    int dl_log, nhg, tsl, hpu;
};

__device__ __forceinline__ DecGeom dec_geom(int group, int head_dim) {
    DecGeom g;
    int dl_log = 1;
    while ((1 << dl_log) < (head_dim >> 3)) ++dl_log;
    const int nu = ATT_THREADS >> dl_log;
    g.dl_log = dl_log;
    g.hpu = 4;
    g.nhg = (group + 3) / 4;
    g.tsl = nu / g.nhg;
    int best = 1 << 30;
    // Estimated time per chunk ~ (per-token overhead + heads * per-head work)
    // / token slots; ties go to more heads per thread.
    for (int h = 1; h <= 4; ++h) {
        const int nhg = (group + h - 1) / h;
        if (nhg > nu) continue;
        const int tsl = nu / nhg;
        const int cost = (20 + 25 * h) * 1024 / tsl;
        if (cost <= best) {
            best = cost;
            g.hpu = h;
            g.nhg = nhg;
            g.tsl = tsl;
        }
    }
    return g;
}

struct DecArgs {
    const bf16_t* q;  // query of the group's first head: [group][head_dim]
    const bf16_t* k_cache;
    const bf16_t* v_cache;
    KvView kv;
    int group, t_begin, t_end;
    float scale;
    // Partial outputs (FINAL == false): head g's accumulator at acc + g *
    // acc_stride, its max and sum at mx/sm + g * stat_stride.
    float* acc;
    long long acc_stride;
    float* mx;
    float* sm;
    long long stat_stride;
    // Final output (FINAL == true): head g at out + g * head_dim.
    bf16_t* out;
};

__device__ __forceinline__ int dec_chunk(int head_dim) {
    const int c = (DEC_CHUNK_ELEMS / head_dim) & ~7;
    return c < DEC_MAX_CHUNK ? c : DEC_MAX_CHUNK;
}

template <int N> struct DecPow2 {
    enum { P = N <= 1 ? 1 : N <= 2 ? 2 : 4, LOG = N <= 1 ? 0 : N <= 2 ? 1 : 2 };
};

// Sums HPU per-lane partial dots over a unit's dl lanes (dl >= P, P = HPU
// rounded up to a power of two) with a reduce-scatter: each butterfly step
// halves the set of heads a lane carries, so it takes log2(dl) + log2(P) - 1
// shuffles instead of HPU * log2(dl). Returns the full sum of head `j`
// (j >= HPU: a padding head), the same on every lane whose top log2(P)
// unit-lane bits name j.
template <int HPU>
__device__ __forceinline__ float dec_reduce_scatter(const float (&part)[HPU], int dl, int li, int& j) {
    constexpr int P = DecPow2<HPU>::P, LOG = DecPow2<HPU>::LOG;
    float v[P];
#pragma unroll
    for (int i = 0; i < P; ++i) v[i] = i < HPU ? part[i] : 0.0f;
    int off = dl >> 1, sel = 0;
#pragma unroll
    for (int st = 0; st < LOG; ++st) {
        const int half = P >> (st + 1);
        const bool upper = (li & off) != 0;
#pragma unroll
        for (int i = 0; i < half; ++i) {
            const float send = upper ? v[i] : v[i + half];
            const float keep = upper ? v[i + half] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
        }
        sel = 2 * sel + (upper ? 1 : 0);
        off >>= 1;
    }
    float r = v[0];
    for (; off > 0; off >>= 1) r += __shfl_xor_sync(0xffffffffu, r, off);
    j = sel;
    return r;
}

template <int HPU, bool FINAL>
__device__ __forceinline__ void decode_core(unsigned char* smem, const DecArgs& a, const DecGeom& g) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int dl = 1 << g.dl_log;
    const int li = tid & (dl - 1);
    const int unit = tid >> g.dl_log;
    const int hg = unit % g.nhg, ts = unit / g.nhg;
    const bool active = ts < g.tsl;
    const int hd = a.kv.head_dim, d0 = li * 8;
    const bool dv = active && d0 < hd;
    const int tsl = g.tsl;

    float qf[HPU][8], acc[HPU][8];
#pragma unroll
    for (int j = 0; j < HPU; ++j) {
        const int gj = hg * HPU + j;
        if (dv && gj < a.group) {
            att_unpack8(*reinterpret_cast<const uint4*>(a.q + (long long)gj * hd + d0), qf[j]);
#pragma unroll
            for (int e = 0; e < 8; ++e) qf[j][e] *= a.scale;
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) qf[j][e] = 0.0f;
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[j][e] = 0.0f;
    }

    float* s_s = reinterpret_cast<float*>(smem + 2 * DEC_STAGE);  // [16][65] scores, then p
    float* m_s = s_s + ATT_MAX_GROUP * DEC_S_STRIDE;               // running max per head
    float* l_s = m_s + ATT_MAX_GROUP;                              // running sum per head
    float* c_s = l_s + ATT_MAX_GROUP;                              // this chunk's rescale
    if (tid < ATT_MAX_GROUP) {
        m_s[tid] = WEIR_NEG_INF;
        l_s[tid] = 0.0f;
        c_s[tid] = 1.0f;
    }

    const int chunk = dec_chunk(hd);
    const int ntok = a.t_end - a.t_begin;
    const int nch = (ntok + chunk - 1) / chunk;

    {
        bf16_t* kd = reinterpret_cast<bf16_t*>(smem);
        att_load_rows(kd, hd, a.k_cache, a.kv, a.t_begin, a.t_end, chunk);
        att_load_rows(kd + DEC_HALF_STAGE / 2, hd, a.v_cache, a.kv, a.t_begin, a.t_end, chunk);
        cp_async_commit();
    }

    for (int c = 0; c < nch; ++c) {
        cp_async_wait_all();
        __syncthreads();  // chunk c visible; everyone is done with chunk c-1's stage and scores
        if (c + 1 < nch) {
            bf16_t* kd = reinterpret_cast<bf16_t*>(smem + ((c + 1) & 1) * DEC_STAGE);
            const int t0 = a.t_begin + (c + 1) * chunk;
            att_load_rows(kd, hd, a.k_cache, a.kv, t0, a.t_end, chunk);
            att_load_rows(kd + DEC_HALF_STAGE / 2, hd, a.v_cache, a.kv, t0, a.t_end, chunk);
        }
        cp_async_commit();

        const bf16_t* ks = reinterpret_cast<const bf16_t*>(smem + (c & 1) * DEC_STAGE);
        const bf16_t* vs = ks + DEC_HALF_STAGE / 2;
        const int nvalid = min(chunk, ntok - c * chunk);

        // Scores. Every lane runs the same number of rounds (full-warp shuffles).
        const int rounds = (nvalid + tsl - 1) / tsl;
        for (int r = 0; r < rounds; ++r) {
            const int tt = ts + r * tsl;
            const bool ok = active && tt < nvalid;
            float kf[8];
            if (ok && d0 < hd) {
                att_unpack8(*reinterpret_cast<const uint4*>(ks + tt * hd + d0), kf);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) kf[e] = 0.0f;
            }
            float part[HPU];
#pragma unroll
            for (int j = 0; j < HPU; ++j) {
                float s = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; ++e) s = fmaf(qf[j][e], kf[e], s);
                part[j] = s;
            }
            if (HPU > 1 && dl >= DecPow2<HPU>::P) {
                int j;
                const float sum = dec_reduce_scatter<HPU>(part, dl, li, j);
                const int gj = hg * HPU + j;
                const int lead = (dl - 1) & ~((dl / DecPow2<HPU>::P) - 1);  // lanes bits naming j
                if (ok && (li & ~lead) == 0 && j < HPU && gj < a.group)
                    s_s[gj * DEC_S_STRIDE + tt] = sum;
            } else {
                for (int off = dl >> 1; off > 0; off >>= 1) {
#pragma unroll
                    for (int j = 0; j < HPU; ++j)
                        part[j] += __shfl_xor_sync(0xffffffffu, part[j], off);
                }
                if (ok && li == 0) {
#pragma unroll
                    for (int j = 0; j < HPU; ++j) {
                        const int gj = hg * HPU + j;
                        if (gj < a.group) s_s[gj * DEC_S_STRIDE + tt] = part[j];
                    }
                }
            }
        }
        __syncthreads();

        // Online softmax update, one warp per head.
        for (int h = warp; h < a.group; h += ATT_THREADS / 32) {
            float* row = s_s + h * DEC_S_STRIDE;
            const bool v0 = lane < nvalid, v1 = lane + 32 < nvalid;
            const float s0 = v0 ? row[lane] : WEIR_NEG_INF;
            const float s1 = v1 ? row[lane + 32] : WEIR_NEG_INF;
            const float m_old = m_s[h];
            const float m_new = fmaxf(m_old, warp_max(fmaxf(s0, s1)));
            const float base = m_new == WEIR_NEG_INF ? 0.0f : m_new;
            const float p0 = v0 ? expf(s0 - base) : 0.0f;
            const float p1 = v1 ? expf(s1 - base) : 0.0f;
            if (v0) row[lane] = p0;
            if (v1) row[lane + 32] = p1;
            const float sum = warp_sum(p0 + p1);
            if (lane == 0) {
                const float corr = expf(m_old - base);
                c_s[h] = corr;
                l_s[h] = l_s[h] * corr + sum;
                m_s[h] = m_new;
            }
        }
        __syncthreads();

        // acc = acc * corr + sum_t p_t * v_t over this unit's token slot.
        if (dv) {
#pragma unroll
            for (int j = 0; j < HPU; ++j) {
                const int gj = hg * HPU + j;
                if (gj < a.group) {
                    const float corr = c_s[gj];
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[j][e] *= corr;
                }
            }
            for (int tt = ts; tt < nvalid; tt += tsl) {
                float vf[8];
                att_unpack8(*reinterpret_cast<const uint4*>(vs + tt * hd + d0), vf);
#pragma unroll
                for (int j = 0; j < HPU; ++j) {
                    const int gj = hg * HPU + j;
                    if (gj < a.group) {
                        const float p = s_s[gj * DEC_S_STRIDE + tt];
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[j][e] = fmaf(p, vf[e], acc[j][e]);
                    }
                }
            }
        }
    }
    cp_async_wait_all();
    __syncthreads();

    // Sum the token slots (they share the running max) through shared memory.
    if (tsl > 1) {
        float* red = reinterpret_cast<float*>(smem);  // (tsl-1)*group*hd <= 4096 floats
        if (dv && ts > 0) {
#pragma unroll
            for (int j = 0; j < HPU; ++j) {
                const int gj = hg * HPU + j;
                if (gj < a.group) {
                    float* p = red + ((ts - 1) * a.group + gj) * hd + d0;
                    reinterpret_cast<float4*>(p)[0] =
                        make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
                    reinterpret_cast<float4*>(p)[1] =
                        make_float4(acc[j][4], acc[j][5], acc[j][6], acc[j][7]);
                }
            }
        }
        __syncthreads();
        if (dv && ts == 0) {
            for (int s2 = 1; s2 < tsl; ++s2) {
#pragma unroll
                for (int j = 0; j < HPU; ++j) {
                    const int gj = hg * HPU + j;
                    if (gj < a.group) {
                        const float* p = red + ((s2 - 1) * a.group + gj) * hd + d0;
                        const float4 x = reinterpret_cast<const float4*>(p)[0];
                        const float4 y = reinterpret_cast<const float4*>(p)[1];
                        acc[j][0] += x.x; acc[j][1] += x.y; acc[j][2] += x.z; acc[j][3] += x.w;
                        acc[j][4] += y.x; acc[j][5] += y.y; acc[j][6] += y.z; acc[j][7] += y.w;
                    }
                }
            }
        }
    }

    if (dv && ts == 0) {
#pragma unroll
        for (int j = 0; j < HPU; ++j) {
            const int gj = hg * HPU + j;
            if (gj >= a.group) continue;
            if (FINAL) {
                const float l = l_s[gj];
                const float inv = l > 0.0f ? 1.0f / l : 0.0f;
                uint4 w;
                w.x = att_pack(acc[j][0] * inv, acc[j][1] * inv);
                w.y = att_pack(acc[j][2] * inv, acc[j][3] * inv);
                w.z = att_pack(acc[j][4] * inv, acc[j][5] * inv);
                w.w = att_pack(acc[j][6] * inv, acc[j][7] * inv);
                *reinterpret_cast<uint4*>(a.out + (long long)gj * hd + d0) = w;
            } else {
                float* p = a.acc + gj * a.acc_stride + d0;
                reinterpret_cast<float4*>(p)[0] =
                    make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
                reinterpret_cast<float4*>(p)[1] =
                    make_float4(acc[j][4], acc[j][5], acc[j][6], acc[j][7]);
            }
        }
    }
    if (!FINAL && tid < a.group) {
        a.mx[tid * a.stat_stride] = m_s[tid];
        a.sm[tid * a.stat_stride] = l_s[tid];
    }
}

template <bool FINAL>
__device__ __forceinline__ void decode_dispatch(unsigned char* smem, const DecArgs& a) {
    const DecGeom g = dec_geom(a.group, a.kv.head_dim);
    switch (g.hpu) {
        case 1: decode_core<1, FINAL>(smem, a, g); break;
        case 2: decode_core<2, FINAL>(smem, a, g); break;
        case 3: decode_core<3, FINAL>(smem, a, g); break;
        default: decode_core<4, FINAL>(smem, a, g); break;
    }
}

// Decode, first pass: partition blockIdx.z of sequence blockIdx.y's context,
// all query heads of KV head blockIdx.x.
// Layout: q [num_seqs][num_heads][head_dim] bf16; part_acc
// [num_seqs][num_heads][max_parts][head_dim] f32 (unnormalised
// sum exp(s - m) v); part_max, part_sum [num_seqs][num_heads][max_parts]
// (m, sum exp(s - m); -inf and 0 for an empty partition).
// Grid (num_kv_heads, num_seqs, max_parts), block 128. Any partition_size
// >= 1 works (chunks of up to 64 tokens stream through shared memory).
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3) attention_decode_partial(
    float* part_acc, float* part_max, float* part_sum, const bf16_t* q, const bf16_t* k_cache,
    const bf16_t* v_cache, const u32* block_tables, const u32* context_lens, int max_blocks_per_seq,
    int num_heads, int num_kv_heads, int head_dim, int block_size, int partition_size,
    int max_parts, float scale) {
    __shared__ __align__(16) unsigned char smem[DEC_SMEM];
    const int kvh = blockIdx.x, s = blockIdx.y, p = blockIdx.z;
    if (!att_shape_ok(num_heads, num_kv_heads, head_dim, block_size) || kvh >= num_kv_heads ||
        p >= max_parts || partition_size <= 0 || max_blocks_per_seq < 0)
        return;
    const int group = num_heads / num_kv_heads;
    const int h0 = kvh * group;

    DecArgs a;
    a.acc = part_acc + (((long long)s * num_heads + h0) * max_parts + p) * head_dim;
    a.acc_stride = (long long)max_parts * head_dim;
    a.mx = part_max + ((long long)s * num_heads + h0) * max_parts + p;
    a.sm = part_sum + ((long long)s * num_heads + h0) * max_parts + p;
    a.stat_stride = max_parts;
    a.out = nullptr;

    // Never past the block table row.
    const long long cap = (long long)max_blocks_per_seq * block_size;
    const long long ctx = min((long long)context_lens[s], cap);
    const long long t0 = (long long)p * partition_size;
    const long long t1 = min(t0 + partition_size, ctx);
    if (t0 >= t1) {
        for (int i = threadIdx.x; i < group * head_dim; i += ATT_THREADS) {
            const int g = i / head_dim;
            a.acc[g * a.acc_stride + (i - g * head_dim)] = 0.0f;
        }
        if (threadIdx.x < group) {
            a.mx[threadIdx.x * a.stat_stride] = WEIR_NEG_INF;
            a.sm[threadIdx.x * a.stat_stride] = 0.0f;
        }
        return;
    }
    a.q = q + ((long long)s * num_heads + h0) * head_dim;
    a.k_cache = k_cache;
    a.v_cache = v_cache;
    a.kv = att_view(block_tables + (long long)s * max_blocks_per_seq, block_size, num_kv_heads, kvh,
                    head_dim);
    a.group = group;
    a.t_begin = (int)t0;
    a.t_end = (int)t1;
    a.scale = scale;
    decode_dispatch<false>(smem, a);
}

// Decode, second pass: merges the partitions of (sequence blockIdx.y, query
// head blockIdx.x): M = max m_p, w_p = exp(m_p - M), out = sum w_p acc_p /
// sum w_p sum_p (bf16). Context 0 gives zeros. Layouts as
// attention_decode_partial; out [num_seqs][num_heads][head_dim] bf16.
// Grid (num_heads, num_seqs), block 128.
extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_decode_reduce(
    bf16_t* out, const float* part_acc, const float* part_max, const float* part_sum,
    const u32* context_lens, int num_heads, int head_dim, int partition_size, int max_parts) {
    __shared__ float scratch[32];
    __shared__ float w_s[ATT_THREADS];
    const int h = blockIdx.x, s = blockIdx.y, tid = threadIdx.x;
    if (h >= num_heads || head_dim <= 0 || head_dim > 256 || partition_size <= 0 || max_parts <= 0)
        return;
    bf16_t* o = out + ((long long)s * num_heads + h) * head_dim;
    const long long ctx = context_lens[s];
    const int nparts = (int)min((ctx + partition_size - 1) / partition_size, (long long)max_parts);
    const long long row = (long long)s * num_heads + h;
    const float* mx = part_max + row * max_parts;
    const float* sm = part_sum + row * max_parts;
    const float* acc = part_acc + row * max_parts * head_dim;

    float m = WEIR_NEG_INF;
    for (int p = tid; p < nparts; p += ATT_THREADS) m = fmaxf(m, mx[p]);
    m = block_max(m, scratch);  // uniform: every thread calls it
    if (nparts == 0 || m == WEIR_NEG_INF) {
        for (int d = tid; d < head_dim; d += ATT_THREADS) o[d] = 0;
        return;
    }
    float denom = 0.0f, a0 = 0.0f, a1 = 0.0f;
    const int d0 = tid, d1 = tid + ATT_THREADS;
    for (int base = 0; base < nparts; base += ATT_THREADS) {
        const int p = base + tid;
        float w = 0.0f;
        if (p < nparts) {
            w = expf(mx[p] - m);  // 0 for empty partitions (-inf)
            denom = fmaf(w, sm[p], denom);
        }
        w_s[tid] = w;
        __syncthreads();
        const int n = min(ATT_THREADS, nparts - base);
#pragma unroll 4
        for (int i = 0; i < n; ++i) {
            const float wi = w_s[i];
            const float* ap = acc + (long long)(base + i) * head_dim;
            if (d0 < head_dim) a0 = fmaf(wi, ap[d0], a0);
            if (d1 < head_dim) a1 = fmaf(wi, ap[d1], a1);
        }
        __syncthreads();
    }
    denom = block_sum(denom, scratch);
    const float inv = denom > 0.0f ? 1.0f / denom : 0.0f;
    if (d0 < head_dim) o[d0] = f32_to_bf16(a0 * inv);
    if (d1 < head_dim) o[d1] = f32_to_bf16(a1 * inv);
}

// ----------------------------------------------------------- prefill core
//
// A block takes its tile's (row, query head) pairs ("vectors", v = row *
// group + head, so a pass covers consecutive rows) R at a time; per pass it
// streams keys 0 ..= the pass's last position in chunks of TK through
// shared memory (Q of the pass, bf16, stays there) and keeps an online
// softmax per vector. Work split per chunk, 128 threads:
//   scores S[R][TK] = Q K^T: thread (rg = tid / 8, kg = tid % 8) computes
//     rows rg*RS .. +RS-1 x keys kg + 8c (c < KS), the whole head_dim in
//     registers (no reduction); the 8 lanes sharing rows combine the row
//     max and sum with xor shuffles; p goes to shared memory [TK][R+4];
//   output O[R][head_dim] += P V: thread (rgo = tid / (DMAX/8), dg = tid %
//     (DMAX/8)) owns rows rgo*RO .. +RO-1 x dims dg*8 .. +7 in registers.
// Rows of K in shared memory are padded by 16 bytes (conflict-free reads
// of 8 different keys). head_dim classes: <= 64, <= 128, <= 256 (a smaller
// head_dim in a class just leaves dimensions unused).

template <int DMAX> struct PfCfg;
template <> struct PfCfg<64> { enum { R = 64, TK = 64, RS = 4, KS = 8, RO = 4 }; };
template <> struct PfCfg<128> { enum { R = 64, TK = 32, RS = 4, KS = 4, RO = 8 }; };
template <> struct PfCfg<256> { enum { R = 32, TK = 16, RS = 2, KS = 2, RO = 8 }; };

struct PfArgs {
    bf16_t* out;
    const bf16_t* q;
    const bf16_t* k_cache;
    const bf16_t* v_cache;
    KvView kv;
    int num_heads, group;
    int row0, len;      // first batch row, rows in the tile
    long long pos0;     // position of the tile's first row
    int kmax;           // keys 0 .. kmax-1 exist (context clamped to the block table)
    float scale;
};

template <int DMAX>
__device__ __forceinline__ void prefill_core(unsigned char* smem, const PfArgs& a) {
    typedef PfCfg<DMAX> C;
    constexpr int R = C::R, TK = C::TK, RS = C::RS, KS = C::KS, RO = C::RO;
    constexpr int QSTR = DMAX, KSTR = DMAX + 8, VSTR = DMAX, PSTR = R + 4;
    constexpr int DG = DMAX / 8;
    constexpr int Q_OFF = 0;
    constexpr int K_OFF = Q_OFF + R * QSTR * 2;
    constexpr int V_OFF = K_OFF + TK * KSTR * 2;
    constexpr int P_OFF = V_OFF + TK * VSTR * 2;
    constexpr int C_OFF = P_OFF + TK * PSTR * 4;
    constexpr int L_OFF = C_OFF + R * 4;
    static_assert(L_OFF + R * 4 <= PF_SMEM, "prefill shared memory");
    static_assert(16 * RS == R && 8 * KS == TK && (ATT_THREADS / DG) * RO == R, "prefill split");

    bf16_t* q_s = reinterpret_cast<bf16_t*>(smem + Q_OFF);
    bf16_t* k_s = reinterpret_cast<bf16_t*>(smem + K_OFF);
    bf16_t* v_s = reinterpret_cast<bf16_t*>(smem + V_OFF);
    float* p_s = reinterpret_cast<float*>(smem + P_OFF);
    float* corr_s = reinterpret_cast<float*>(smem + C_OFF);
    float* l_s = reinterpret_cast<float*>(smem + L_OFF);

    const int tid = threadIdx.x;
    const int kg = tid & 7, rg = tid >> 3;
    const int dg = tid % DG, rgo = tid / DG;
    const int hd = a.kv.head_dim;
    const int G = a.group;
    const int nvec = a.len * G;
    const bool pv_on = dg * 8 < hd;
    const int ppr = hd >> 3;

    for (int v0 = 0; v0 < nvec; v0 += R) {
        const int last_row = (min(v0 + R, nvec) - 1) / G;
        const int kend = (int)min((long long)a.kmax, a.pos0 + last_row + 1);
        const int nch = kend > 0 ? (kend + TK - 1) / TK : 0;

        int lim[RS];
#pragma unroll
        for (int i = 0; i < RS; ++i) {
            const int v = v0 + rg * RS + i;
            lim[i] = v < nvec ? (int)min(a.pos0 + v / G, (long long)a.kmax - 1) : -1;
        }
        float m[RS], l[RS];
#pragma unroll
        for (int i = 0; i < RS; ++i) {
            m[i] = WEIR_NEG_INF;
            l[i] = 0.0f;
        }
        float acc[RO][8];
#pragma unroll
        for (int i = 0; i < RO; ++i)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[i][e] = 0.0f;

        // Q of the pass (zeros for vectors past the tile).
        for (int i = tid; i < R * ppr; i += ATT_THREADS) {
            const int v = i / ppr, part = i - v * ppr;
            const int vg = v0 + v;
            const bool ok = vg < nvec;
            const int r = vg / G, h = vg - r * G;
            const long long off =
                ok ? ((long long)(a.row0 + r) * a.num_heads + a.kv.kv_head * G + h) * hd + part * 8 : 0;
            cp_async16(q_s + v * QSTR + part * 8, a.q + off, ok);
        }
        if (nch > 0) att_load_rows(k_s, KSTR, a.k_cache, a.kv, 0, kend, TK);
        cp_async_commit();

        for (int c = 0; c < nch; ++c) {
            const int kbase = c * TK;
            cp_async_wait_all();
            __syncthreads();  // K(c) (and Q) visible; everyone is done with V_s and P_s of chunk c-1
            att_load_rows(v_s, VSTR, a.v_cache, a.kv, kbase, kend, TK);
            cp_async_commit();

            // Scores for rows rg*RS+i, keys kbase + kg + 8c.
            float s[RS][KS];
#pragma unroll
            for (int i = 0; i < RS; ++i)
#pragma unroll
                for (int j = 0; j < KS; ++j) s[i][j] = 0.0f;
            const bf16_t* qp = q_s + rg * RS * QSTR;
            const bf16_t* kp = k_s + kg * KSTR;
            for (int d = 0; d < hd; d += 8) {
                uint4 qw[RS], kw[KS];
#pragma unroll
                for (int i = 0; i < RS; ++i) qw[i] = *reinterpret_cast<const uint4*>(qp + i * QSTR + d);
#pragma unroll
                for (int j = 0; j < KS; ++j)
                    kw[j] = *reinterpret_cast<const uint4*>(kp + j * 8 * KSTR + d);
#pragma unroll
                for (int w = 0; w < 4; ++w) {
                    float qa[RS], qb[RS], ka[KS], kb[KS];
#pragma unroll
                    for (int i = 0; i < RS; ++i) {
                        const u32 x = att_word(qw[i], w);
                        qa[i] = att_lo(x);
                        qb[i] = att_hi(x);
                    }
#pragma unroll
                    for (int j = 0; j < KS; ++j) {
                        const u32 x = att_word(kw[j], w);
                        ka[j] = att_lo(x);
                        kb[j] = att_hi(x);
                    }
#pragma unroll
                    for (int i = 0; i < RS; ++i)
#pragma unroll
                        for (int j = 0; j < KS; ++j) {
                            s[i][j] = fmaf(qa[i], ka[j], s[i][j]);
                            s[i][j] = fmaf(qb[i], kb[j], s[i][j]);
                        }
                }
            }

            // Causal mask, online softmax per row (8 lanes share a row).
#pragma unroll
            for (int i = 0; i < RS; ++i) {
                float mc = WEIR_NEG_INF;
#pragma unroll
                for (int j = 0; j < KS; ++j) {
                    const int key = kbase + kg + 8 * j;
                    s[i][j] = key <= lim[i] ? s[i][j] * a.scale : WEIR_NEG_INF;
                    mc = fmaxf(mc, s[i][j]);
                }
                mc = fmaxf(mc, __shfl_xor_sync(0xffffffffu, mc, 1));
                mc = fmaxf(mc, __shfl_xor_sync(0xffffffffu, mc, 2));
                mc = fmaxf(mc, __shfl_xor_sync(0xffffffffu, mc, 4));
                const float m_new = fmaxf(m[i], mc);
                const float base = m_new == WEIR_NEG_INF ? 0.0f : m_new;
                const float corr = expf(m[i] - base);
                float sum = 0.0f;
#pragma unroll
                for (int j = 0; j < KS; ++j) {
                    const float p = expf(s[i][j] - base);
                    s[i][j] = p;
                    sum += p;
                }
                sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                sum += __shfl_xor_sync(0xffffffffu, sum, 4);
                l[i] = l[i] * corr + sum;
                m[i] = m_new;
                if (kg == 0) corr_s[rg * RS + i] = corr;
            }
#pragma unroll
            for (int j = 0; j < KS; ++j) {
                float* pp = p_s + (kg + 8 * j) * PSTR + rg * RS;
                if constexpr (RS == 4) {
                    *reinterpret_cast<float4*>(pp) = make_float4(s[0][j], s[1][j], s[2][j], s[3][j]);
                } else {
#pragma unroll
                    for (int i = 0; i < RS; ++i) pp[i] = s[i][j];
                }
            }
            __syncthreads();  // P and corr visible; everyone is done reading K_s
            if (c + 1 < nch) att_load_rows(k_s, KSTR, a.k_cache, a.kv, kbase + TK, kend, TK);
            cp_async_commit();
            cp_async_wait_one();  // V(c) landed (K(c+1) may still be in flight)
            __syncthreads();

            if (pv_on) {
#pragma unroll
                for (int i = 0; i < RO; ++i) {
                    const float cr = corr_s[rgo * RO + i];
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[i][e] *= cr;
                }
                const int nk = min(TK, kend - kbase);
                const bf16_t* vp = v_s + dg * 8;
                const float* pp = p_s + rgo * RO;
                for (int k = 0; k < nk; ++k) {
                    float vf[8], p[RO];
                    att_unpack8(*reinterpret_cast<const uint4*>(vp + k * VSTR), vf);
#pragma unroll
                    for (int i = 0; i < RO; i += 4) {
                        const float4 x = *reinterpret_cast<const float4*>(pp + k * PSTR + i);
                        p[i] = x.x; p[i + 1] = x.y; p[i + 2] = x.z; p[i + 3] = x.w;
                    }
#pragma unroll
                    for (int i = 0; i < RO; ++i)
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[i][e] = fmaf(p[i], vf[e], acc[i][e]);
                }
            }
        }
        cp_async_wait_all();

        if (kg == 0) {
#pragma unroll
            for (int i = 0; i < RS; ++i) l_s[rg * RS + i] = l[i];
        }
        __syncthreads();
        if (pv_on) {
#pragma unroll
            for (int i = 0; i < RO; ++i) {
                const int vg = v0 + rgo * RO + i;
                if (vg < nvec) {
                    const int r = vg / G, h = vg - r * G;
                    const float lv = l_s[rgo * RO + i];
                    const float inv = lv > 0.0f ? 1.0f / lv : 0.0f;
                    uint4 w;
                    w.x = att_pack(acc[i][0] * inv, acc[i][1] * inv);
                    w.y = att_pack(acc[i][2] * inv, acc[i][3] * inv);
                    w.z = att_pack(acc[i][4] * inv, acc[i][5] * inv);
                    w.w = att_pack(acc[i][6] * inv, acc[i][7] * inv);
                    bf16_t* op = a.out +
                                 ((long long)(a.row0 + r) * a.num_heads + a.kv.kv_head * G + h) * hd +
                                 dg * 8;
                    *reinterpret_cast<uint4*>(op) = w;
                }
            }
        }
        __syncthreads();  // before the next pass reuses Q_s, P_s and l_s
    }
}

// Causal attention for one tile (up to 64 consecutive rows of one sequence)
// and all query heads of KV head blockIdx.y. Row i of tile blockIdx.x is
// batch row tile_row + i at position tile_pos + i and attends to positions
// 0 ..= tile_pos + i (its keys and values already in the cache).
// Layout: q, out [rows][num_heads][head_dim] bf16; block_tables
// [num_seqs][max_blocks_per_seq]; tile_* [num_tiles].
// Grid (num_tiles, num_kv_heads), block 128. Tiles of one row (decode rows
// of a mixed batch) take the decode path over the whole context.
extern "C" __global__ void __launch_bounds__(ATT_THREADS, 3) attention_prefill(
    bf16_t* out, const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache,
    const u32* block_tables, const u32* tile_seq, const u32* tile_row, const u32* tile_len,
    const u32* tile_pos, int max_blocks_per_seq, int num_heads, int num_kv_heads, int head_dim,
    int block_size, float scale) {
    __shared__ __align__(16) unsigned char smem[ATT_SMEM];
    const int tile = blockIdx.x, kvh = blockIdx.y;
    if (!att_shape_ok(num_heads, num_kv_heads, head_dim, block_size) || kvh >= num_kv_heads ||
        max_blocks_per_seq <= 0)
        return;
    const int group = num_heads / num_kv_heads;
    const u32 seq = tile_seq[tile];
    const int row0 = (int)tile_row[tile];
    const int len = (int)min(tile_len[tile], (u32)ATT_MAX_TILE);
    const long long pos0 = tile_pos[tile];
    if (len == 0) return;
    const u32* bt = block_tables + (long long)seq * max_blocks_per_seq;
    const long long cap = (long long)max_blocks_per_seq * block_size;
    const int kmax = (int)min(cap, pos0 + len);
    const KvView kv = att_view(bt, block_size, num_kv_heads, kvh, head_dim);

    if (len == 1) {
        DecArgs a;
        a.q = q + ((long long)row0 * num_heads + kvh * group) * head_dim;
        a.k_cache = k_cache;
        a.v_cache = v_cache;
        a.kv = kv;
        a.group = group;
        a.t_begin = 0;
        a.t_end = kmax;
        a.scale = scale;
        a.acc = nullptr;
        a.acc_stride = 0;
        a.mx = nullptr;
        a.sm = nullptr;
        a.stat_stride = 0;
        a.out = out + ((long long)row0 * num_heads + kvh * group) * head_dim;
        decode_dispatch<true>(smem, a);
        return;
    }

    PfArgs a;
    a.out = out;
    a.q = q;
    a.k_cache = k_cache;
    a.v_cache = v_cache;
    a.kv = kv;
    a.num_heads = num_heads;
    a.group = group;
    a.row0 = row0;
    a.len = len;
    a.pos0 = pos0;
    a.kmax = kmax;
    a.scale = scale;
    if (head_dim <= 64) prefill_core<64>(smem, a);
    else if (head_dim <= 128) prefill_core<128>(smem, a);
    else prefill_core<256>(smem, a);
}
