// sampling.cu: the on-GPU sampler, `sample_rows`. One block of 1024
// threads per row of f32 logits: penalties in place, then a greedy argmax
// or a random draw after temperature, min_p, top_k and top_p, and the raw
// log probability of the chosen token. It follows the CPU sampler
// (`sampler/process.rs`, `sampler/select.rs`) step by step; the host sends
// only rows whose request uses no logit_bias, no allowed_token_ids and no
// top-n logprobs, with parameters and history ids already validated.
//
// Per row:
//  1. want_logprob: max and Σ exp(l - max) of the UNPROCESSED row (f32 per
//     thread, f64 across threads), log_norm = max + ln Σ, as
//     `math::log_sum_exp`. The raw logits of the first SMP_RAW_CAP history
//     entries are saved in shared memory as the penalties overwrite them.
//  2. Penalties (`process::apply_penalties`): one thread per history entry
//     (entries name distinct tokens), then a barrier. Ids >= vocab are
//     skipped.
//  3. One pass: max, lowest id of the max, smallest finite logit (reused
//     from step 1 when no penalty applies). Greedy: that id (0xFFFFFFFF
//     when every logit is -inf).
//  4. Random: s = (l - max) * (1 / temperature), w = exp(s) with the CPU's
//     own polynomial (`math::exp_nonpos`, same f32 operations, no FMA), so
//     weights and the min_p cut (w < min_p -> 0) are bit-identical to the
//     CPU's. top_k and top_p are thresholds on the ordered bit pattern
//     ("key") of s, found without sorting (below). The draw keeps the
//     tokens with key >= threshold and w > 0 and walks them in ascending
//     token id.
//  5. out_tokens[row], and out_logprobs[row] = raw[token] - log_norm when
//     want_logprob (0 otherwise, and 0 when there is no candidate).
//
// Weights as integers. Every sum that decides something (top_p masses, the
// draw) is in 64-bit fixed point: fx(w) = trunc(w * 2^F) with
// F = 63 - ceil(log2 vocab), so a row's total is < 2^63. Integer sums are
// exact and independent of the order of additions, which makes shared
// memory atomics deterministic and makes the block-wide prefix sums exact.
// A token's weight is off by less than 2^-F (2^-45 at 256k tokens) against
// the most likely token's 1; tokens with w < 2^-F relative to the maximum
// (s < about -31) are kept but get no draw mass, which removes at most
// vocab * 2^-F (about 1e-8) of probability.
//
// Threshold search (top_k: the k-th largest s among tokens with w > 0;
// top_p: the largest s whose tokens at or above it hold >= top_p of the
// mass of the tokens left by min_p and top_k). A window [lo, hi] of keys
// that holds the threshold is narrowed by histograms of the live tokens
// (w > 0, key >= the top_k threshold when top_p follows top_k, key in the
// window), counting tokens
// (top_k) or summing fx weights (top_p, as two u32 atomics with carry: a
// 64-bit shared atomicAdd is a CAS loop). Each round walks the bins from
// the top until the count or mass reaches what is still needed.
//  - Round 1: 2048 bins linear in s over [s_lo, 0], s_lo = max(s of the
//    smallest finite logit, -87, ln min_p): bins spread over the values
//    actually present, so atomics rarely collide. Round 2: 2048 sub-bins of
//    the chosen bin. A value bin is an interval of keys (the bin is
//    monotone in s); its ends are found by bisection over keys, so the
//    window stays exact whatever the float rounding of the bin formula.
//  - As soon as the window holds <= SMP_LIST_CAP (5376) tokens, one pass
//    copies their keys to shared memory and the rest runs there.
//  - Then radix rounds of 8 bits below the highest bit where the window's
//    smallest and largest keys differ (a window of equal keys ends the
//    search at once).
//  Typical cost: 2 passes over the row per threshold (round 1 and the copy
//  to shared memory); top_p after a small top_k copies the top_k survivors
//  straight away (1 pass). Degenerate rows (over 5376 tokens within
//  1/2048^2 of the s range) take up to 2 more passes, plus one per radix
//  round when their keys still differ; a window of equal logits ends at
//  once.
//
// Cost per row, in passes over the vocabulary (reads; penalties touch only
// history tokens): greedy 1; random without top_k/top_p 2 (statistics,
// draw); top_k or top_p alone 4; both 5 (top_p after a top_k that keeps at
// most 5376 tokens), 6 otherwise; the draw also re-reads one chunk of
// ceil(vocab / 1024) tokens. want_logprob adds 1 (the normaliser sum; the
// statistics pass is shared when no penalty applies) or 2 with penalties.
//
// Draw: thread t owns the contiguous chunk [t*C, (t+1)*C) of the row and sums
// the fx weights of its kept tokens; an exact exclusive scan over the 1024
// sums gives each chunk's cumulative start; target = floor(uniform * total).
// The one chunk with start <= target < start + sum is then walked by the
// whole block, one token per thread, with an exact block scan: the token
// whose cumulative weight first exceeds target is chosen (the CPU rule
// `cum > u * total`). With exact sums a token is always found; the argmax
// is only a defensive fallback.
//
// Deliberate differences from the CPU sampler:
//  - top_k keeps every token whose s equals the k-th largest s, so more
//    than k when ties straddle the cut (the CPU keeps exactly k, lower ids
//    first). Ties are equal scaled logits s, as in the CPU's ordering.
//  - top_p keeps every token whose s equals that of the last token needed to
//    reach the mass (the CPU stops at that token, lower ids first); masses
//    are the fixed-point sums above, not f64 sums of f32 weights, so a cut
//    that the CPU decides within about 1e-9 of the boundary may differ.
//  - With top_k or top_p the draw walks the kept tokens in token id order,
//    the CPU walks them most likely first: the same distribution, but the
//    same uniform may pick a different token. Without top_k/top_p both walk
//    the whole row in id order and agree up to the fixed-point rounding.
//  - Raw logprob of a history token past the first SMP_RAW_CAP (4096)
//    entries: its raw logit is recovered by undoing the penalties, exact to
//    about an ulp of the logit, instead of being saved.
//  - log_norm sums f32 per thread over a strided slice, then f64: the same
//    terms as the CPU (same exp), summed in another order.
//
// Arithmetic that decides a token uses explicit round-to-nearest intrinsics
// (__fadd_rn, __fmul_rn, ...), so results do not depend on --fmad.
//
// ABI: grid = (rows), block = (1024), no dynamic shared memory; about 42 KB
// of static shared memory. Another block size writes 0xFFFFFFFF. Reads and writes only row `blockIdx.x` of
// `logits`, its history entries and its outputs; no allocation, so it can
// be captured in a CUDA graph.

#define SMP_THREADS 1024
#define SMP_WARPS (SMP_THREADS / WEIR_WARP)
#define SMP_NONE 0xFFFFFFFFu
#define SMP_VBINS 2048      // bins of the value rounds
#define SMP_RBITS 8         // bits per radix round
#define SMP_RAW_CAP 4096    // history entries whose raw logit is saved
#define SMP_POOL 3072       // u64 words of histogram / key-list memory (24 KB)
#define SMP_LIST_OFF 384    // u64 words of radix histograms before the list
#define SMP_LIST_CAP ((SMP_POOL - SMP_LIST_OFF) * 2)
#define SMP_EXP_FLOOR (-87.0f)
#define SMP_FLT_MAX 3.40282347e+38f
#define SMP_POS_INF (__int_as_float(0x7f800000))
#define SMP_KEY_NEG_INF 0x007FFFFFu   // smp_key(-inf)
#define SMP_KEY_POS_ZERO 0x80000000u  // smp_key(+0), the largest scaled logit

typedef unsigned long long smp_u64;

struct SampleRow {            // 48 bytes; the host writes the same #[repr(C)] struct
    float temperature;        // > 0 when greedy == 0
    float top_p;              // (0, 1]; 1 = off
    float min_p;              // [0, 1]; 0 = off
    int top_k;                // 0 = off
    float repetition_penalty; // 1 = off
    float frequency_penalty;
    float presence_penalty;
    u32 pen_start;            // first entry of this row's history in pen_tokens/pen_generated
    u32 pen_len;              // 0 when no penalties apply
    float uniform;            // the draw, in [0, 1)
    int greedy;               // != 0: argmax
    int want_logprob;         // != 0: write out_logprobs[row]
};
static_assert(sizeof(SampleRow) == 48, "SampleRow must match the host's 48-byte #[repr(C)] struct");

struct __align__(16) smp_f4 {
    float x, y, z, w;
};

struct SmpShared {
    smp_u64 pool[SMP_POOL];   // histograms, then the key list
    float raw[SMP_RAW_CAP];   // raw logits of the first history entries
    smp_u64 scan[SMP_WARPS];
    double sumd[SMP_WARPS];
    float red[SMP_WARPS];
    u32 redu[SMP_WARPS];
    smp_u64 sel_excl;
    smp_u64 win_off;
    u32 sel_bin;
    u32 list_n;
    u32 win_thread;
    u32 token;
    float raw_tok;
    float log_norm;
};

// What the random path needs to weigh a logit.
struct SmpRow {
    const float* L;
    u32 n;
    float m;         // row maximum (finite)
    float inv_t;     // 1 / temperature
    float min_p;
    float fx_scale;  // 2^F
};

// ---- scalar helpers -------------------------------------------------------

// `math::exp_nonpos`, operation for operation (no FMA contraction), so the
// result is bit-identical to the CPU's.
__device__ __forceinline__ float smp_exp_nonpos(float x) {
    const float LOG2_E = 1.44269504088896340736f;
    const float LN2_HI = 0.6933594f;
    const float LN2_LO = -2.1219444e-4f;
    const float ROUND = 12582912.0f;
    const float xc = x > SMP_EXP_FLOOR ? x : SMP_EXP_FLOOR;
    const float t = __fadd_rn(__fmul_rn(xc, LOG2_E), ROUND);
    const float n = __fsub_rn(t, ROUND);
    const float r = __fsub_rn(__fsub_rn(xc, __fmul_rn(n, LN2_HI)), __fmul_rn(n, LN2_LO));
    float p = 1.9875691e-4f;
    p = __fadd_rn(__fmul_rn(p, r), 1.3981999e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 8.333452e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 4.1665796e-2f);
    p = __fadd_rn(__fmul_rn(p, r), 1.6666665e-1f);
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    const float e_r = __fadd_rn(__fadd_rn(__fmul_rn(p, __fmul_rn(r, r)), r), 1.0f);
    const u32 n_bits = __float_as_uint(t) - __float_as_uint(ROUND);
    const float two_n = __uint_as_float((n_bits + 127u) << 23);
    return x < SMP_EXP_FLOOR ? 0.0f : __fmul_rn(e_r, two_n);
}

// Order-preserving map of a float to u32: a < b (total order, -0 < +0) iff
// key(a) < key(b).
__device__ __forceinline__ u32 smp_key(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float smp_unkey(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ float smp_scaled(const SmpRow& r, float l) {
    return __fmul_rn(__fsub_rn(l, r.m), r.inv_t);
}

// The unnormalised probability of scaled logit s (1 at the maximum), 0
// below min_p: `Scale::weight`.
__device__ __forceinline__ float smp_weight(const SmpRow& r, float s) {
    const float w = smp_exp_nonpos(s);
    return w >= r.min_p ? w : 0.0f;
}

__device__ __forceinline__ smp_u64 smp_fixed(const SmpRow& r, float w) {
    return __float2ull_rz(__fmul_rn(w, r.fx_scale));
}

// Bin of s among SMP_VBINS linear bins starting at `base`; non-decreasing
// in s (each rounded operation is monotone), clamped.
__device__ __forceinline__ u32 smp_vbin(float s, float base, float scale) {
    const int b = __float2int_rd(__fmul_rn(__fsub_rn(s, base), scale));
    return (u32)min(max(b, 0), SMP_VBINS - 1);
}

// A row's penalty parameters.
struct SmpPen {
    u32 start, len;
    float rep, freq, pres;
    bool on;  // some penalty changes logits (`SamplingParams::has_penalties`)
};

__device__ __forceinline__ SmpPen smp_pen(const SampleRow* pr) {
    SmpPen p;
    p.start = pr->pen_start;
    p.len = pr->pen_len;
    p.rep = pr->repetition_penalty;
    p.freq = pr->frequency_penalty;
    p.pres = pr->presence_penalty;
    p.on = p.len > 0 && (p.rep != 1.0f || p.freq != 0.0f || p.pres != 0.0f);
    return p;
}

// `process::apply_penalties` for one token.
__device__ __forceinline__ float smp_penalize(float l, const SmpPen& pp, u32 gen) {
    const float rep = pp.rep, freq = pp.freq, pres = pp.pres;
    if (rep != 1.0f) l = l > 0.0f ? fminf(__fdiv_rn(l, rep), SMP_FLT_MAX) : __fmul_rn(l, rep);
    if (gen > 0) {
        l = __fsub_rn(l, __fmul_rn(freq, __uint2float_rn(gen)));
        l = __fsub_rn(l, pres);
    }
    return l;
}

// Inverse of smp_penalize, to about an ulp (used past SMP_RAW_CAP entries).
__device__ __forceinline__ float smp_unpenalize(float v, const SmpPen& pp, u32 gen) {
    const float rep = pp.rep, freq = pp.freq, pres = pp.pres;
    if (gen > 0) {
        v = __fadd_rn(v, pres);
        v = __fadd_rn(v, __fmul_rn(freq, __uint2float_rn(gen)));
    }
    if (rep != 1.0f) v = v > 0.0f ? __fmul_rn(v, rep) : __fdiv_rn(v, rep);
    return v;
}

// ---- block-wide helpers (every thread calls them, every thread gets the result)

__device__ __forceinline__ smp_u64 smp_warp_incl(smp_u64 x, int lane) {
#pragma unroll
    for (int o = 1; o < WEIR_WARP; o <<= 1) {
        const smp_u64 y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    return x;
}

// Exclusive prefix sum of v in thread order; *total gets the block's sum.
// Integer, hence exact.
__device__ __forceinline__ smp_u64 smp_block_excl(smp_u64 v, smp_u64* scr, smp_u64* total) {
    const int lane = threadIdx.x % WEIR_WARP, warp = threadIdx.x / WEIR_WARP;
    const smp_u64 incl = smp_warp_incl(v, lane);
    __syncthreads();
    if (lane == WEIR_WARP - 1) scr[warp] = incl;
    __syncthreads();
    if (warp == 0) scr[lane] = smp_warp_incl(scr[lane], lane);
    __syncthreads();
    *total = scr[SMP_WARPS - 1];
    return (warp > 0 ? scr[warp - 1] : 0ull) + incl - v;
}

__device__ __forceinline__ double smp_block_sum_d(double v, double* scr) {
    const int lane = threadIdx.x % WEIR_WARP, warp = threadIdx.x / WEIR_WARP;
#pragma unroll
    for (int o = WEIR_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scr[warp] = v;
    __syncthreads();
    v = scr[lane];
#pragma unroll
    for (int o = WEIR_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ u32 smp_block_min_u32(u32 v, u32* scr) {
    const int lane = threadIdx.x % WEIR_WARP, warp = threadIdx.x / WEIR_WARP;
#pragma unroll
    for (int o = WEIR_WARP / 2; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) scr[warp] = v;
    __syncthreads();
    v = scr[lane];
#pragma unroll
    for (int o = WEIR_WARP / 2; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- threshold search ------------------------------------------------------

// Smallest key in [lo, hi] whose value bin (for base, scale) is >= bin; hi + 1
// if none. Keys in [SMP_KEY_NEG_INF, SMP_KEY_POS_ZERO] are ordinary floats,
// where the bin is monotone.
__device__ __forceinline__ u32 smp_first_in_bin(u32 lo, u32 hi, u32 bin, float base, float scale) {
    u32 a = lo, b = hi + 1;
#pragma unroll 1
    while (a < b) {
        const u32 mid = a + ((b - a) >> 1);
        if (smp_vbin(smp_unkey(mid), base, scale) >= bin) b = mid;
        else a = mid + 1;
    }
    return a;
}

// The threshold key for top_k (mass == false: the k-th largest key among live
// tokens; *kept_out = how many live tokens have a key >= it, or ~0 when not
// known) or top_p (mass == true: the largest key whose live tokens at or
// above it hold >= ceil(top_p * total) fixed-point mass). Live tokens: w > 0
// and key >= tau_lo. `known`: the number of live tokens if known (else ~0).
// Returns tau_lo when no cut is needed.
//
// The search keeps a window [wlo, whi] of keys that holds the threshold; the
// live tokens above the window account for `k - need` (or `total - ...` of
// mass). Every round's bins are key intervals, so the window stays one.
__device__ __forceinline__ u32 smp_threshold(const SmpRow& r, SmpShared& sh, bool mass, u32 k,
                                             float top_p, u32 tau_lo, float s_lo, smp_u64 known,
                                             smp_u64* kept_out) {
    const u32 tid = threadIdx.x;
    u32* const hb = (u32*)sh.pool;
    u32* const list = hb + 2 * SMP_LIST_OFF;
    u32 wlo = max(tau_lo, SMP_KEY_NEG_INF), whi = SMP_KEY_POS_ZERO;
    // Value rounds: bins linear in s, from `base` with `scale` bins per unit.
    float base = s_lo;
    float scale = s_lo < 0.0f ? __fdiv_rn((float)SMP_VBINS, -s_lo) : 0.0f;
    int stage = scale > 0.0f && scale <= 1e30f ? 0 : 2;  // 0, 1: value rounds; 2: radix
    bool first = true, in_list = false, radix_ready = false;
    int lo_bit = 32;  // radix rounds: key bits >= lo_bit are fixed by the window
    smp_u64 need = k, live_n = known;
    u32 ln = 0;
    *kept_out = ~0ull;

#pragma unroll 1
    for (;;) {
        if (wlo == whi) break;  // one key left: it is the threshold
        if (!in_list && live_n <= SMP_LIST_CAP) {
            // Few enough: copy the window's keys to shared memory once.
            __syncthreads();
            if (tid == 0) sh.list_n = 0;
            __syncthreads();
            for (u32 i = tid; i < r.n; i += SMP_THREADS) {
                const float s = smp_scaled(r, r.L[i]);
                const u32 key = smp_key(s);
                if (key < wlo || key > whi || !(smp_weight(r, s) > 0.0f)) continue;
                const u32 pos = atomicAdd(&sh.list_n, 1u);
                if (pos < SMP_LIST_CAP) list[pos] = key;
            }
            __syncthreads();
            ln = min(sh.list_n, (u32)SMP_LIST_CAP);
            in_list = true;
            stage = 2;
        }
        if (stage == 2 && !radix_ready) {
            // Shrink the window to the keys present; radix below their common bits.
            radix_ready = true;
            u32 kmn = 0xFFFFFFFFu, kmx = 0;
            if (in_list) {
                for (u32 j = tid; j < ln; j += SMP_THREADS) {
                    const u32 key = list[j];
                    kmn = min(kmn, key);
                    kmx = max(kmx, key);
                }
            } else {
                for (u32 i = tid; i < r.n; i += SMP_THREADS) {
                    const float s = smp_scaled(r, r.L[i]);
                    const u32 key = smp_key(s);
                    if (key < wlo || key > whi || !(smp_weight(r, s) > 0.0f)) continue;
                    kmn = min(kmn, key);
                    kmx = max(kmx, key);
                }
            }
            kmn = smp_block_min_u32(kmn, sh.redu);
            kmx = ~smp_block_min_u32(~kmx, sh.redu);
            if (kmn > kmx) break;  // no live token (cannot happen: the caller's max is live)
            wlo = kmn;
            whi = kmx;
            if (wlo == whi) break;
            lo_bit = 32 - __clz(wlo ^ whi);
        }

        // Histogram of the window: counts, and fixed-point masses for top_p.
        const bool vstage = stage < 2;
        const int shift = vstage ? 0 : max(lo_bit - SMP_RBITS, 0);
        const u32 nb = vstage ? (u32)SMP_VBINS : (1u << (lo_bit - shift));
        const u32 nbmax = vstage ? (u32)SMP_VBINS : (1u << SMP_RBITS);
        u32* const cnt = hb;
        u32* const mlo = hb + nbmax;
        u32* const mhi = hb + 2 * nbmax;
        __syncthreads();
        for (u32 b = tid; b < nb; b += SMP_THREADS) {
            cnt[b] = 0;
            mlo[b] = 0;
            mhi[b] = 0;
        }
        __syncthreads();
        auto add = [&](u32 d, float w) {
            atomicAdd(&cnt[d], 1u);
            if (mass) {
                const smp_u64 f = smp_fixed(r, w);
                const u32 lo = (u32)f;
                u32 hi = (u32)(f >> 32);
                if (lo != 0) {
                    const u32 old = atomicAdd(&mlo[d], lo);
                    if (old + lo < old) ++hi;  // carry out of the low word
                }
                if (hi != 0) atomicAdd(&mhi[d], hi);
            }
        };
        if (in_list) {
            for (u32 j = tid; j < ln; j += SMP_THREADS) {
                const u32 key = list[j];
                if (key < wlo || key > whi) continue;
                add((key >> shift) & (nb - 1), mass ? smp_weight(r, smp_unkey(key)) : 0.0f);
            }
        } else {
            for (u32 i = tid; i < r.n; i += SMP_THREADS) {
                const float s = smp_scaled(r, r.L[i]);
                const u32 key = smp_key(s);
                if (key < wlo || key > whi) continue;
                const float w = smp_weight(r, s);
                if (!(w > 0.0f)) continue;
                add(vstage ? smp_vbin(s, base, scale) : (key >> shift) & (nb - 1), w);
            }
        }

        // Walk the bins from the top: thread t holds bins nb-1-2t and nb-2-2t.
        if (tid == 0) {
            sh.sel_bin = 0;
            sh.sel_excl = 0;
        }
        const u32 t2 = 2u * tid;
        smp_u64 v0 = 0, v1 = 0;
        __syncthreads();
        if (t2 < nb) {
            const u32 bh = nb - 1 - t2;
            v0 = mass ? (((smp_u64)mhi[bh] << 32) + mlo[bh]) : cnt[bh];
            v1 = mass ? (((smp_u64)mhi[bh - 1] << 32) + mlo[bh - 1]) : cnt[bh - 1];
        }
        smp_u64 total;
        const smp_u64 ex = smp_block_excl(v0 + v1, sh.scan, &total);
        if (first) {
            first = false;
            if (!mass) {
                if (total <= k) {  // top_k keeps every live token
                    wlo = tau_lo;
                    *kept_out = total;
                    break;
                }
            } else {
                const double t = ceil((double)top_p * (double)total);
                need = t < 1.0 ? 1ull : (smp_u64)t;
                if (need > total) need = total;
            }
        }
        if (t2 < nb) {
            if (ex < need && need <= ex + v0) {
                sh.sel_bin = nb - 1 - t2;
                sh.sel_excl = ex;
            } else if (ex + v0 < need && need <= ex + v0 + v1) {
                sh.sel_bin = nb - 2 - t2;
                sh.sel_excl = ex + v0;
            }
        }
        __syncthreads();
        const u32 b = sh.sel_bin;
        need -= sh.sel_excl;
        live_n = cnt[b];
        if (vstage) {
            // The keys of value bin b form an interval: find it by bisection.
            const u32 lo = smp_first_in_bin(wlo, whi, b, base, scale);
            whi = smp_first_in_bin(wlo, whi, b + 1, base, scale) - 1;
            wlo = lo;
            base = __fadd_rn(base, __fdiv_rn((float)b, scale));
            scale = __fmul_rn(scale, (float)SMP_VBINS);
            stage = stage == 0 && scale <= 1e30f ? 1 : 2;
        } else {
            const u32 low = (1u << shift) - 1u;  // bits below this round's digit
            const u32 lo = (wlo & ~((nb << shift) - 1u)) | (b << shift);
            wlo = max(wlo, lo);
            whi = min(whi, lo | low);
            lo_bit = shift;
        }
    }
    // Count mode: live tokens above the window plus those in it.
    if (!mass && *kept_out == ~0ull && !first) *kept_out = (k - need) + live_n;
    __syncthreads();
    return wlo;
}

// ---- the kernel ------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(SMP_THREADS, 1)
    sample_rows(u32* out_tokens, float* out_logprobs, float* logits, const SampleRow* params,
                const u32* pen_tokens, const u32* pen_generated, int vocab) {
    __shared__ SmpShared sh;
    const u32 tid = threadIdx.x;
    const u32 row = blockIdx.x;
    if (blockDim.x != SMP_THREADS || vocab <= 0) {
        if (tid == 0) {
            out_tokens[row] = SMP_NONE;
            out_logprobs[row] = 0.0f;
        }
        return;
    }
    const u32 n = (u32)vocab;
    float* const L = logits + (size_t)row * n;
    const SampleRow* const pr = params + row;
    const bool want_lp = pr->want_logprob != 0;
    const bool pen = smp_pen(pr).on;

    // Max, lowest id of the max and smallest finite logit of the row as it
    // is now: one pass.
    float m = WEIR_NEG_INF, mn = SMP_POS_INF;
    u32 argmax = SMP_NONE;
    auto row_stats = [&]() {
        float mx = WEIR_NEG_INF, lo = SMP_POS_INF;
        u32 arg = SMP_NONE;
        for (u32 i = tid; i < n; i += SMP_THREADS) {
            const float l = L[i];
            if (l > mx) {
                mx = l;
                arg = i;
            }
            if (l != WEIR_NEG_INF) lo = fminf(lo, l);
        }
        m = block_max(mx, sh.red);
        argmax = smp_block_min_u32(mx == m ? arg : SMP_NONE, sh.redu);
        mn = -block_max(-lo, sh.red);
    };

    // 1. Raw log-softmax normaliser, before any edit (kept in shared memory
    // until step 5; the barriers of later steps order it).
    if (want_lp) {
        row_stats();
        float acc = 0.0f;
        if (m != WEIR_NEG_INF)
            for (u32 i = tid; i < n; i += SMP_THREADS)
                acc = __fadd_rn(acc, smp_exp_nonpos(__fsub_rn(L[i], m)));
        const double sum = smp_block_sum_d((double)acc, sh.sumd);
        if (tid == 0) sh.log_norm = m == WEIR_NEG_INF ? WEIR_NEG_INF : (float)((double)m + log(sum));
    }

    // 2. Penalties, one thread per (distinct) history entry.
    if (pen) {
        const SmpPen pp = smp_pen(pr);
        for (u32 j = tid; j < pp.len; j += SMP_THREADS) {
            const size_t e = (size_t)pp.start + j;
            const u32 tok = pen_tokens[e];
            if (tok >= n) continue;
            const float l = L[tok];
            if (want_lp && j < SMP_RAW_CAP) sh.raw[j] = l;
            L[tok] = smp_penalize(l, pp, pen_generated[e]);
        }
        __syncthreads();
    }

    // 3. Statistics of the processed row (those of step 1 when nothing changed).
    if (!want_lp || pen) row_stats();

    u32 token = argmax;  // greedy; SMP_NONE when every logit is -inf
    if (pr->greedy == 0 && m != WEIR_NEG_INF) {
        // 4. Random.
        SmpRow r;
        r.L = L;
        r.n = n;
        r.m = m;
        r.inv_t = __fdiv_rn(1.0f, pr->temperature);
        r.min_p = pr->min_p;
        const u32 log2n = 32 - __clz(n - 1);  // ceil(log2 n)
        r.fx_scale = __uint_as_float((u32)(127 + 63 - log2n) << 23);

        const int top_k = pr->top_k;
        const float top_p = pr->top_p;
        const bool use_k = top_k > 0 && (u32)top_k < n;
        const bool use_p = top_p < 1.0f;
        u32 tau = 0;
        if (use_k || use_p) {
            float s_lo = fmaxf(smp_scaled(r, mn), SMP_EXP_FLOOR);  // mn <= m, finite
            if (r.min_p > 0.0f) s_lo = fmaxf(s_lo, logf(r.min_p) - 1e-3f);
            smp_u64 kept = ~0ull;
#pragma unroll 1
            for (int phase = 0; phase < 2; ++phase) {
                const bool mass = phase == 1;
                if (mass ? !use_p : !use_k) continue;
                const float lo = tau != 0 ? fmaxf(s_lo, smp_unkey(tau)) : s_lo;
                tau = smp_threshold(r, sh, mass, (u32)top_k, top_p, tau, lo, kept, &kept);
            }
        }

        // Draw: chunk sums, exact scan, then a block-wide walk of one chunk.
        auto kept_fx = [&](float l) -> smp_u64 {
            const float s = smp_scaled(r, l);
            if (smp_key(s) < tau) return 0ull;
            return smp_fixed(r, smp_weight(r, s));
        };
        const u32 C = ((n + SMP_THREADS - 1) / SMP_THREADS + 3u) & ~3u;
        const u32 beg = min(tid * C, n), end = min(beg + C, n);
        smp_u64 acc = 0;
        if ((n & 3u) == 0 && ((size_t)L & 15) == 0) {
            for (u32 i = beg; i < end; i += 4) {
                const smp_f4 v = *(const smp_f4*)(L + i);
                acc += kept_fx(v.x) + kept_fx(v.y) + kept_fx(v.z) + kept_fx(v.w);
            }
        } else {
            for (u32 i = beg; i < end; ++i) acc += kept_fx(L[i]);
        }
        smp_u64 total;
        const smp_u64 start = smp_block_excl(acc, sh.scan, &total);
        if (tid == 0) {
            sh.win_thread = SMP_NONE;
            sh.token = argmax;
        }
        smp_u64 target = 0;
        if (total > 0) {
            target = __double2ull_rz((double)pr->uniform * (double)total);
            if (target >= total) target = total - 1;
        }
        __syncthreads();
        if (total > 0 && acc > 0 && start <= target && target - start < acc) {
            sh.win_thread = tid;
            sh.win_off = target - start;
        }
        __syncthreads();
        const u32 wt = sh.win_thread;
        if (wt != SMP_NONE) {
            const u32 wb = min(wt * C, n), we = min(wb + C, n);
            smp_u64 off = sh.win_off;
#pragma unroll 1
            for (u32 base = wb; base < we; base += SMP_THREADS) {
                const u32 i = base + tid;
                const smp_u64 f = i < we ? kept_fx(L[i]) : 0ull;
                smp_u64 piece;
                const smp_u64 ex = smp_block_excl(f, sh.scan, &piece);
                if (f > 0 && ex <= off && off - ex < f) sh.token = i;
                if (off < piece) break;
                off -= piece;
            }
        }
        __syncthreads();
        token = sh.token;
    } else if (pr->greedy == 0) {
        token = SMP_NONE;
    }

    // 5. Outputs, with the raw logprob of the chosen token.
    float logprob = 0.0f;
    if (want_lp && token != SMP_NONE) {
        if (tid == 0) sh.raw_tok = L[token];
        __syncthreads();
        if (pen) {
            // Re-read (not kept in registers through steps 3-4).
            const SmpPen pp = smp_pen(pr);
            for (u32 j = tid; j < pp.len; j += SMP_THREADS) {
                const size_t e = (size_t)pp.start + j;
                if (pen_tokens[e] != token) continue;
                sh.raw_tok = j < SMP_RAW_CAP ? sh.raw[j] : smp_unpenalize(L[token], pp, pen_generated[e]);
            }
        }
        __syncthreads();
        logprob = __fsub_rn(sh.raw_tok, sh.log_norm);
    }
    if (tid == 0) {
        out_tokens[row] = token;
        out_logprobs[row] = logprob;
    }
}
