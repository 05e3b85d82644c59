// jquant native CPU kernels, called from jitted JAX through the XLA FFI.
//
// One source, compiled once per instruction set into its own shared library (a library built with
// -mavx512vnni must never be loaded on a CPU without it, so the ISAs are not mixed in one binary):
//   JQ_ISA_AVX512VNNI: 512-bit vectors, `vpdpbusd` (u8 x s8 -> s32, 4 products per 32-bit lane);
//   JQ_ISA_AVXVNNI:    256-bit vectors, `vpdpbusd` (AVX-VNNI, client CPUs without AVX-512);
//   JQ_ISA_AVX2:       256-bit vectors, the same 4-product step done exactly with `vpmaddwd` on 16-bit halves.
// Everything above the few primitives in `namespace isa` (packing order, tiling, epilogues, threading) is shared.
//
// Packed weight layouts (built in Python, see jquant/kernels/packing.py; loading and dispatch: jquant/kernels/native.py):
//   int8: (N/16, ceil(K/4), 16, 4) bytes: for each block of 16 output columns and each 4 consecutive k, 16 dwords,
//         dword c holding w[k..k+3, n0+c] (zero padded in K and N).
//   int4: (N/16, ceil(K/8), 16) uint32: dword c holds w[k..k+7, n0+c] as 4-bit two's complement nibbles, nibble j
//         in bits 4j..4j+3.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace isa {
#if defined(JQ_ISA_AVX512VNNI)
constexpr int W = 16;  // int32 / f32 lanes per vector
using VI = __m512i;
using VF = __m512;
inline VI loadi(const void* p) { return _mm512_loadu_si512(p); }
inline VI zeroi() { return _mm512_setzero_si512(); }
inline VF zerof() { return _mm512_setzero_ps(); }
inline VF loadf(const float* p) { return _mm512_loadu_ps(p); }
inline void storei(void* p, VI v) { _mm512_storeu_si512(p, v); }
inline void storef(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF bcastf(float x) { return _mm512_set1_ps(x); }
inline VF fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF mulf(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF addf(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF maxf(VF a, VF b) { return _mm512_max_ps(a, b); }
inline VF minf(VF a, VF b) { return _mm512_min_ps(a, b); }
inline VI addi(VI a, VI b) { return _mm512_add_epi32(a, b); }
inline VI muli(VI a, VI b) { return _mm512_mullo_epi32(a, b); }
inline VI bcasti(int32_t x) { return _mm512_set1_epi32(x); }
inline VF cvtf(VI v) { return _mm512_cvtepi32_ps(v); }
inline VI cvti(VF v) { return _mm512_cvtps_epi32(v); }  // exact for integral v
inline VF round_even(VF v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// Sign-extended byte J of every dword.
template <int J>
inline VI byte_lane(VI v) {
  if constexpr (J == 3) return _mm512_srai_epi32(v, 24);
  else return _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * J), 24);
}
// Signed nibble J of every dword, as float (16-entry table lookup on the low 4 index bits).
template <int J>
inline VF nibble_lane(VI v) {
  const VF lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  if constexpr (J == 0) return _mm512_permutexvar_ps(v, lut);
  else return _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * J), lut);
}
// The weight operand of the 4-product step, prepared once and reused for every row of a tile.
struct WPrep {
  VI w;
};
inline WPrep prep_w(VI w) { return {w}; }
struct APrep {
  VI a;
};
inline APrep prep_a(uint32_t a4) { return {_mm512_set1_epi32(static_cast<int>(a4))}; }
// acc + sum_j a_u8[j] * w_s8[j] per dword (exact).
inline VI dot4(VI acc, const APrep& a, const WPrep& w) { return _mm512_dpbusd_epi32(acc, a.a, w.w); }
#elif defined(JQ_ISA_AVX2) || defined(JQ_ISA_AVXVNNI)
constexpr int W = 8;
using VI = __m256i;
using VF = __m256;
inline VI loadi(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline VI zeroi() { return _mm256_setzero_si256(); }
inline VF zerof() { return _mm256_setzero_ps(); }
inline VF loadf(const float* p) { return _mm256_loadu_ps(p); }
inline void storei(void* p, VI v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
inline void storef(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VF bcastf(float x) { return _mm256_set1_ps(x); }
inline VF fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF mulf(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF addf(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF maxf(VF a, VF b) { return _mm256_max_ps(a, b); }
inline VF minf(VF a, VF b) { return _mm256_min_ps(a, b); }
inline VI addi(VI a, VI b) { return _mm256_add_epi32(a, b); }
inline VI muli(VI a, VI b) { return _mm256_mullo_epi32(a, b); }
inline VI bcasti(int32_t x) { return _mm256_set1_epi32(x); }
inline VF cvtf(VI v) { return _mm256_cvtepi32_ps(v); }
inline VI cvti(VF v) { return _mm256_cvtps_epi32(v); }
inline VF round_even(VF v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
template <int J>
inline VI byte_lane(VI v) {
  if constexpr (J == 3) return _mm256_srai_epi32(v, 24);
  else return _mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * J), 24);
}
template <int J>
inline VF nibble_lane(VI v) {
  if constexpr (J == 7) return _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 28));
  else return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28 - 4 * J), 28));
}
#if defined(JQ_ISA_AVXVNNI)
// 256-bit `vpdpbusd` (AVX-VNNI, VEX encoded).
struct WPrep {
  VI w;
};
inline WPrep prep_w(VI w) { return {w}; }
struct APrep {
  VI a;
};
inline APrep prep_a(uint32_t a4) { return {_mm256_set1_epi32(static_cast<int>(a4))}; }
inline VI dot4(VI acc, const APrep& a, const WPrep& w) { return _mm256_dpbusd_avx_epi32(acc, a.a, w.w); }
#else
// vpmaddwd form: the even bytes (0, 2) and odd bytes (1, 3) of each dword as 16-bit pairs.
struct WPrep {
  VI even, odd;
};
inline WPrep prep_w(VI w) { return {_mm256_srai_epi16(_mm256_slli_epi16(w, 8), 8), _mm256_srai_epi16(w, 8)}; }
struct APrep {
  VI even, odd;
};
inline APrep prep_a(uint32_t a4) {
  return {_mm256_set1_epi32(static_cast<int>(a4 & 0x00FF00FFu)),
          _mm256_set1_epi32(static_cast<int>((a4 >> 8) & 0x00FF00FFu))};
}
inline VI dot4(VI acc, const APrep& a, const WPrep& w) {
  acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a.even, w.even));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a.odd, w.odd));
}
#endif
#elif defined(JQ_ISA_EMU512)
// Scalar stand-ins with the 512-bit intrinsics' semantics: run the 16-lane code paths (tile shapes, VPB = 1,
// the nibble table) on machines without AVX-512, for testing only.
constexpr int W = 16;
struct VI {
  int32_t v[16];
};
struct VF {
  float v[16];
};
inline VI loadi(const void* p) { VI r; std::memcpy(r.v, p, 64); return r; }
inline VI zeroi() { return VI{}; }
inline VF zerof() { return VF{}; }
inline VF loadf(const float* p) { VF r; std::memcpy(r.v, p, 64); return r; }
inline void storei(void* p, VI v) { std::memcpy(p, v.v, 64); }
inline void storef(float* p, VF v) { std::memcpy(p, v.v, 64); }
#define JQ_MAP(EXPR) for (int i = 0; i < 16; ++i) r.v[i] = (EXPR); return r
inline VF bcastf(float x) { VF r; JQ_MAP(x); }
inline VF fmadd(VF a, VF b, VF c) { VF r; JQ_MAP(std::fma(a.v[i], b.v[i], c.v[i])); }
inline VF mulf(VF a, VF b) { VF r; JQ_MAP(a.v[i] * b.v[i]); }
inline VF addf(VF a, VF b) { VF r; JQ_MAP(a.v[i] + b.v[i]); }
inline VF maxf(VF a, VF b) { VF r; JQ_MAP(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
inline VF minf(VF a, VF b) { VF r; JQ_MAP(a.v[i] < b.v[i] ? a.v[i] : b.v[i]); }
inline VI addi(VI a, VI b) { VI r; JQ_MAP(static_cast<int32_t>(static_cast<uint32_t>(a.v[i]) + b.v[i])); }
inline VI muli(VI a, VI b) { VI r; JQ_MAP(static_cast<int32_t>(static_cast<uint32_t>(a.v[i]) * b.v[i])); }
inline VI bcasti(int32_t x) { VI r; JQ_MAP(x); }
inline VF cvtf(VI a) { VF r; JQ_MAP(static_cast<float>(a.v[i])); }
inline VI cvti(VF a) { VI r; JQ_MAP(static_cast<int32_t>(std::nearbyint(a.v[i]))); }
inline VF round_even(VF a) { VF r; JQ_MAP(std::nearbyint(a.v[i])); }
template <int J>
inline VI byte_lane(VI a) { VI r; JQ_MAP(static_cast<int32_t>(static_cast<uint32_t>(a.v[i]) << (24 - 8 * J)) >> 24); }
template <int J>
inline VF nibble_lane(VI a) {
  static const float lut[16] = {0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1};
  VF r;
  JQ_MAP(lut[(static_cast<uint32_t>(a.v[i]) >> (4 * J)) & 15]);
}
struct WPrep {
  VI w;
};
inline WPrep prep_w(VI w) { return {w}; }
struct APrep {
  uint32_t a;
};
inline APrep prep_a(uint32_t a4) { return {a4}; }
inline VI dot4(VI acc, const APrep& a, const WPrep& w) {
  VI r;
  for (int i = 0; i < 16; ++i) {
    int32_t s = 0;
    for (int j = 0; j < 4; ++j)
      s += static_cast<int32_t>((a.a >> (8 * j)) & 0xFF) * static_cast<int8_t>(static_cast<uint32_t>(w.w.v[i]) >> (8 * j));
    r.v[i] = acc.v[i] + s;
  }
  return r;
}
#undef JQ_MAP
#else
#error "define JQ_ISA_AVX512VNNI, JQ_ISA_AVXVNNI, JQ_ISA_AVX2 or JQ_ISA_EMU512"
#endif
constexpr int VPB = 16 / W;  // vectors per 16-column block
}  // namespace isa

namespace {

using namespace isa;

#if defined(JQ_ISA_AVX512VNNI) || defined(JQ_ISA_EMU512)
constexpr int GEMM_MR = 6, GEMM_NR = 4;  // 24 zmm accumulators
constexpr int WO_MR = 4, WO_NR = 2;      // 2 x 8 zmm (partial + total)
#elif defined(JQ_ISA_AVXVNNI)
constexpr int GEMM_MR = 6, GEMM_NR = 1;  // 12 ymm accumulators (+ 2 weight, 1 activation registers)
constexpr int WO_MR = 2, WO_NR = 1;
#else
constexpr int GEMM_MR = 3, GEMM_NR = 1;  // 6 ymm accumulators (+ 4 prepared weight, 2 activation registers)
constexpr int WO_MR = 2, WO_NR = 1;
#endif

// ---- threading: XLA's intra-op pool from the FFI context ---------------------------------------------------------
// Items are claimed from an atomic counter by the calling thread and by the scheduled helpers. The caller waits for
// the items (not for the helpers), so a helper that starts late finds nothing to do and touches nothing but `state`.
struct ForState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <class F>
void claim_items(ForState* st, const F* f, int64_t n) {
  for (;;) {
    int64_t i = st->next.fetch_add(1, std::memory_order_relaxed);
    if (i >= n) return;
    (*f)(i);
    st->done.fetch_add(1, std::memory_order_release);
  }
}

template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& f) {
  int64_t threads = std::min<int64_t>(pool.num_threads(), n);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  auto st = std::make_shared<ForState>();
  const F* fp = &f;
  for (int64_t t = 1; t < threads; ++t) {
    pool.Schedule([st, fp, n]() { claim_items(st.get(), fp, n); });
  }
  claim_items(st.get(), fp, n);
  while (st->done.load(std::memory_order_acquire) < n) _mm_pause();
}

// ---- int8 GEMM: u8 (or sign-flipped s8) activations x packed s8 weights -> s32 accumulators + epilogue ------------
enum OutKind : int64_t { OUT_S32 = 0, OUT_F32 = 1, OUT_U8 = 2, OUT_S8 = 3 };

struct Epilogue {
  int64_t kind;
  const int32_t* col_offset;  // (N): integer bias / extra corrections, added to the int32 sums
  const int32_t* col_sums;    // (N): sum_k w[k, n], for the activation zero-point correction
  const int32_t* row_zp;      // (1), (M) or (M / batch): activation zero point per tensor or per row
  int64_t row_zp_n;
  int32_t zp_shift;           // 128 when s8 activations ran as u8 (a + 128), else 0
  const float* row_scale;     // (1), (M) or (M / batch)
  int64_t row_scale_n;
  const float* col_scale;     // (N)
  const float* bias;          // (N) float bias or nullptr
  bool relu;
  float out_inv_scale;
  float out_zp;
  float qmin, qmax;
  void* out;
  int64_t n;
};

// Writes the 16 columns [n0, n0 + 16) of row m (the part inside N) from the accumulators (a0, a1) (a1 unused with
// 512-bit vectors): r = acc - (row_zp + shift) * col_sums + col_offset (exact int32), then the float epilogue.
// Taken by value and not inlined: an accumulator whose address escapes gets spilled in the tile's inner loop.
__attribute__((noinline)) void epilogue_block(const Epilogue& e, int64_t m, int64_t n0, VI a0, VI a1) {
  const VI acc[2] = {a0, a1};
  alignas(64) int32_t ibuf[16];
  alignas(64) float fbuf[16];
  const int64_t cols = std::min<int64_t>(16, e.n - n0);
  // Column vectors of the last block may run past N: copy them into zero-padded buffers first.
  alignas(64) int32_t off_buf[16] = {0};
  alignas(64) int32_t sum_buf[16] = {0};
  alignas(64) float cs_buf[16] = {0};
  alignas(64) float b_buf[16] = {0};
  const int32_t* off = e.col_offset + n0;
  const int32_t* sums = e.col_sums + n0;
  const float* cs = e.col_scale + n0;
  const float* bs = e.bias ? e.bias + n0 : nullptr;
  if (cols < 16) {
    std::memcpy(off_buf, off, cols * sizeof(int32_t));
    std::memcpy(sum_buf, sums, cols * sizeof(int32_t));
    std::memcpy(cs_buf, cs, cols * sizeof(float));
    if (bs) std::memcpy(b_buf, bs, cols * sizeof(float));
    off = off_buf;
    sums = sum_buf;
    cs = cs_buf;
    if (bs) bs = b_buf;
  }
  // Per-row vectors repeat over the rows (an unbatched per-row vector under vmap covers one batch element).
  const VI neg_zp = bcasti(-(e.row_zp[m % e.row_zp_n] + e.zp_shift));
  const VF rs = bcastf(e.row_scale[m % e.row_scale_n]);
  for (int v = 0; v < VPB; ++v) {
    const VI r = addi(addi(acc[v], loadi(off + v * W)), muli(neg_zp, loadi(sums + v * W)));
    if (e.kind == OUT_S32) {
      storei(ibuf + v * W, r);
      continue;
    }
    // acc * (row_scale * col_scale), in this order (as the XLA form computes it).
    VF y = mulf(cvtf(r), mulf(rs, loadf(cs + v * W)));
    if (bs) y = addf(y, loadf(bs + v * W));
    if (e.relu) y = maxf(y, zerof());
    if (e.kind == OUT_F32) {
      storef(fbuf + v * W, y);
    } else {
      VF q = addf(round_even(mulf(y, bcastf(e.out_inv_scale))), bcastf(e.out_zp));
      q = minf(maxf(q, bcastf(e.qmin)), bcastf(e.qmax));
      storei(ibuf + v * W, cvti(q));
    }
  }
  if (e.kind == OUT_S32) {
    std::memcpy(static_cast<int32_t*>(e.out) + m * e.n + n0, ibuf, cols * sizeof(int32_t));
  } else if (e.kind == OUT_F32) {
    std::memcpy(static_cast<float*>(e.out) + m * e.n + n0, fbuf, cols * sizeof(float));
  } else if (e.kind == OUT_U8) {
    uint8_t* dst = static_cast<uint8_t*>(e.out) + m * e.n + n0;
    for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<uint8_t>(ibuf[c]);
  } else {
    int8_t* dst = static_cast<int8_t*>(e.out) + m * e.n + n0;
    for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<int8_t>(ibuf[c]);
  }
}

// 4 activation bytes of row `a` at k = 4 * k4 (the last group of a K that is not a multiple of 4 is zero padded;
// the packed weight is zero there, so the pad value does not matter, but reading past the buffer would).
template <bool FLIP>
inline uint32_t a_quad(const uint8_t* a, int64_t k4, int64_t k) {
  uint32_t v;
  if (4 * k4 + 4 <= k) {
    std::memcpy(&v, a + 4 * k4, 4);
  } else {
    v = 0;  // byte by byte: a variable-length memcpy is a call, and a call spills every vector register
    for (int64_t i = 0; i < k - 4 * k4; ++i) v |= static_cast<uint32_t>(a[4 * k4 + i]) << (8 * i);
  }
  return FLIP ? v ^ 0x80808080u : v;
}

// One k4 step of a tile: prepare the NR * VPB weight vectors once, then one 4-product step per row and vector.
template <int MR, int NR, bool FLIP, bool TAIL>
__attribute__((always_inline)) inline void gemm_step(VI (&acc)[MR][NR * VPB], const int8_t* const (&bp)[NR],
                                                     const uint8_t* ap, int64_t lda, int64_t q, int64_t k) {
  WPrep w[NR * VPB];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 16
    for (int v = 0; v < VPB; ++v) w[j * VPB + v] = prep_w(loadi(bp[j] + q * 64 + v * W * 4));
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    uint32_t a4;
    if constexpr (TAIL) {
      a4 = a_quad<FLIP>(ap + r * lda, q, k);
    } else {
      std::memcpy(&a4, ap + r * lda + 4 * q, 4);
      if constexpr (FLIP) a4 ^= 0x80808080u;
    }
    const APrep ar = prep_a(a4);
#pragma GCC unroll 16
    for (int c = 0; c < NR * VPB; ++c) acc[r][c] = dot4(acc[r][c], ar, w[c]);
  }
}

// One MR x (NR * 16) tile over the whole K. Accumulators stay in registers: every loop over them has constant bounds
// and is fully unrolled, and no accumulator's address escapes (check the asm of the inner loop for stack refs).
template <int MR, int NR, bool FLIP>
void gemm_tile(const uint8_t* a, int64_t lda, const int8_t* b, int64_t k, int64_t k4n, int64_t m0, int64_t nb0,
               const Epilogue& e) {
  VI acc[MR][NR * VPB];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NR * VPB; ++c) acc[r][c] = zeroi();
  const int8_t* bp[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) bp[j] = b + (nb0 + j) * k4n * 64;
  const uint8_t* ap = a + m0 * lda;
  const int64_t k4_full = k / 4;
  // One loop including the ragged K tail (a predictable branch per activation load): a separate tail step after the
  // loop made g++ 12 store every accumulator to the stack on each iteration.
  if (k4_full == k4n) {
    for (int64_t q = 0; q < k4n; ++q) gemm_step<MR, NR, FLIP, false>(acc, bp, ap, lda, q, k);
  } else {
    for (int64_t q = 0; q < k4n; ++q) gemm_step<MR, NR, FLIP, true>(acc, bp, ap, lda, q, k);
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) epilogue_block(e, m0 + r, (nb0 + j) * 16, acc[r][j * VPB], acc[r][j * VPB + VPB - 1]);
}

template <int MR, int NR, bool FLIP>
void gemm_tile_mr(int mr, const uint8_t* a, int64_t lda, const int8_t* b, int64_t k, int64_t k4n, int64_t m0,
                  int64_t nb0, const Epilogue& e) {
  if constexpr (MR == 0) {
    (void)mr;
  } else if (mr == MR) {
    gemm_tile<MR, NR, FLIP>(a, lda, b, k, k4n, m0, nb0, e);
  } else {
    gemm_tile_mr<MR - 1, NR, FLIP>(mr, a, lda, b, k, k4n, m0, nb0, e);
  }
}

template <int NR, bool FLIP>
void gemm_tile_nr(int nr, int mr, const uint8_t* a, int64_t lda, const int8_t* b, int64_t k, int64_t k4n,
                  int64_t m0, int64_t nb0, const Epilogue& e) {
  if constexpr (NR == 0) {
    (void)nr;
  } else if (nr == NR) {
    gemm_tile_mr<GEMM_MR, NR, FLIP>(mr, a, lda, b, k, k4n, m0, nb0, e);
  } else {
    gemm_tile_nr<NR - 1, FLIP>(nr, mr, a, lda, b, k, k4n, m0, nb0, e);
  }
}

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

ffi::Error GemmS8Impl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b_packed, ffi::Buffer<ffi::S32> col_sums,
                      ffi::Buffer<ffi::S32> row_zp, ffi::Buffer<ffi::S32> col_offset, ffi::Buffer<ffi::F32> row_scale, ffi::Buffer<ffi::F32> col_scale, ffi::Buffer<ffi::F32> bias,
                      ffi::Buffer<ffi::F32> out_q, ffi::Result<ffi::AnyBuffer> out, int64_t k, int64_t n,
                      int64_t out_kind, bool relu, bool has_bias, int64_t qmin, int64_t qmax) {
  const bool flip = a.element_type() == ffi::S8;
  if (!flip && a.element_type() != ffi::U8) return ffi::Error::InvalidArgument("jquant gemm: a must be u8 or s8");
  if (k <= 0 || n <= 0) return ffi::Error::InvalidArgument("jquant gemm: k and n must be positive");
  const int64_t k4n = div_up(k, 4), nbn = div_up(n, 16);
  if (static_cast<int64_t>(a.element_count()) % k) return ffi::Error::InvalidArgument("jquant gemm: a is not (M, K)");
  const int64_t m = a.element_count() / k;
  if (static_cast<int64_t>(b_packed.size_bytes()) != nbn * k4n * 64)
    return ffi::Error::InvalidArgument(
        "jquant gemm: packed weight size does not match (K, N) (is the weight batched under vmap? only activations "
        "may carry vmap batch dims)");
  if (static_cast<int64_t>(col_offset.element_count()) != n || static_cast<int64_t>(col_scale.element_count()) != n ||
      static_cast<int64_t>(col_sums.element_count()) != n || (has_bias && static_cast<int64_t>(bias.element_count()) != n))
    return ffi::Error::InvalidArgument(
        "jquant gemm: column vectors must have N elements (only activations and per-row values may carry vmap batch "
        "dims)");
  const int64_t rz_n = row_zp.element_count();
  if (rz_n < 1 || m % rz_n)
    return ffi::Error::InvalidArgument("jquant gemm: row_zp must have a divisor of M elements");
  const int64_t rs_n = row_scale.element_count();
  if (rs_n < 1 || m % rs_n)
    return ffi::Error::InvalidArgument("jquant gemm: row_scale must have a divisor of M elements");
  if (static_cast<int64_t>(out->element_count()) != m * n)
    return ffi::Error::InvalidArgument("jquant gemm: output is not (M, N)");
  if (out_q.element_count() != 2) return ffi::Error::InvalidArgument("jquant gemm: out_q is [1 / scale, zero point]");
  if (m == 0) return ffi::Error::Success();
  Epilogue e{out_kind,
             col_offset.typed_data(),
             col_sums.typed_data(),
             row_zp.typed_data(),
             rz_n,
             flip ? 128 : 0,
             row_scale.typed_data(),
             rs_n,
             col_scale.typed_data(),
             has_bias ? bias.typed_data() : nullptr,
             relu,
             out_q.typed_data()[0],
             out_q.typed_data()[1],
             static_cast<float>(qmin),
             static_cast<float>(qmax),
             out->untyped_data(),
             n};
  const uint8_t* ap = static_cast<const uint8_t*>(a.untyped_data());
  const int8_t* bp = static_cast<const int8_t*>(b_packed.untyped_data());
  // Work items: (column chunk of GEMM_NR blocks) x (row panel); a panel is a few row tiles so that both cores get
  // items even for one column chunk, and the chunk's packed weight stays in L2 across the panel's tiles.
  const int64_t n_chunks = div_up(nbn, GEMM_NR);
  const int64_t panel = GEMM_MR * std::max<int64_t>(1, std::min<int64_t>(16, div_up(div_up(m, GEMM_MR), 2)));
  const int64_t m_panels = div_up(m, panel);
  auto item = [&](int64_t i) {
    const int64_t chunk = i / m_panels, p = i % m_panels;
    const int64_t nb0 = chunk * GEMM_NR;
    const int nr = static_cast<int>(std::min<int64_t>(GEMM_NR, nbn - nb0));
    for (int64_t m0 = p * panel; m0 < std::min(m, (p + 1) * panel); m0 += GEMM_MR) {
      const int mr = static_cast<int>(std::min<int64_t>(GEMM_MR, m - m0));
      if (flip) gemm_tile_nr<GEMM_NR, true>(nr, mr, ap, k, bp, k, k4n, m0, nb0, e);
      else gemm_tile_nr<GEMM_NR, false>(nr, mr, ap, k, bp, k, k4n, m0, nb0, e);
    }
  };
  parallel_for(pool, n_chunks * m_panels, item);
  return ffi::Error::Success();
}

// ---- weight-only GEMM: float activations x packed int8 / int4 weights, group-wise scales, f32 out ----------------
// y[m, n] = sum_g scale[g, n] * sum_{k in g} x[m, k] * q[k, n]: activations are not quantized.
template <int BITS>
struct WoStep;  // how many k one packed dword covers and how to expand it

template <>
struct WoStep<8> {
  static constexpr int KS = 4;
  template <int J>
  static VF lane(VI v) { return cvtf(byte_lane<J>(v)); }
};
template <>
struct WoStep<4> {
  static constexpr int KS = 8;
  template <int J>
  static VF lane(VI v) { return nibble_lane<J>(v); }
};

// Independent partial sums per tile element: with few rows, one accumulator per element would make every k a
// dependent FMA (4-cycle latency) and bound a GEMV by latency; JA accumulators take the k-lanes in turn.
template <int MR>
constexpr int wo_ja() { return MR == 1 ? 4 : (MR == 2 ? 2 : 1); }

template <int BITS, int MR, int NR, int J>
inline void wo_lanes(VF (&p)[wo_ja<MR>()][MR][NR * VPB], const VI (&wv)[NR * VPB], const float* x, int64_t ldx,
                     int64_t kk) {
  if constexpr (J < WoStep<BITS>::KS) {
    constexpr int A = J % wo_ja<MR>();
#pragma GCC unroll 16
    for (int c = 0; c < NR * VPB; ++c) {
      const VF wf = WoStep<BITS>::template lane<J>(wv[c]);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) p[A][r][c] = fmadd(bcastf(x[r * ldx + kk + J]), wf, p[A][r][c]);
    }
    wo_lanes<BITS, MR, NR, J + 1>(p, wv, x, ldx, kk);
  }
}

// x: f32 rows padded (with zeros) to a multiple of KS in K; group_size a multiple of KS (or K itself).
template <int BITS, int MR, int NR>
void wo_tile(const float* x, int64_t ldx, const uint8_t* w, int64_t ksn, int64_t k, int64_t gs, const float* scale,
             int64_t n, int64_t m0, int64_t nb0, float* y) {
  constexpr int KS = WoStep<BITS>::KS;
  VF t[MR][NR * VPB];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NR * VPB; ++c) t[r][c] = zerof();
  const float* xr = x + m0 * ldx;
  const int64_t groups = div_up(k, gs);
  for (int64_t g = 0; g < groups; ++g) {
    constexpr int JA = wo_ja<MR>();
    VF p[JA][MR][NR * VPB];
#pragma GCC unroll 16
    for (int a = 0; a < JA; ++a)
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
        for (int c = 0; c < NR * VPB; ++c) p[a][r][c] = zerof();
    const int64_t s0 = g * gs / KS, s1 = std::min(ksn, div_up((g + 1) * gs, KS));
    for (int64_t s = s0; s < s1; ++s) {
      VI wv[NR * VPB];
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j)
#pragma GCC unroll 16
        for (int v = 0; v < VPB; ++v) wv[j * VPB + v] = loadi(w + ((nb0 + j) * ksn + s) * 64 + v * W * 4);
      wo_lanes<BITS, MR, NR, 0>(p, wv, xr, ldx, s * KS);
    }
    // Scales of this group for the tile's columns (zero padded past N).
    VF sc[NR * VPB];
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const int64_t n0 = (nb0 + j) * 16;
      if (n0 + 16 <= n) {
#pragma GCC unroll 16
        for (int v = 0; v < VPB; ++v) sc[j * VPB + v] = loadf(scale + g * n + n0 + v * W);
      } else {
        alignas(64) float buf[16] = {0};
        std::memcpy(buf, scale + g * n + n0, std::max<int64_t>(0, n - n0) * sizeof(float));
#pragma GCC unroll 16
        for (int v = 0; v < VPB; ++v) sc[j * VPB + v] = loadf(buf + v * W);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
      for (int c = 0; c < NR * VPB; ++c) {
        VF sum = p[0][r][c];
#pragma GCC unroll 16
        for (int a = 1; a < JA; ++a) sum = addf(sum, p[a][r][c]);
        t[r][c] = fmadd(sum, sc[c], t[r][c]);
      }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const int64_t n0 = (nb0 + j) * 16;
      if (n0 >= n) continue;
      float* dst = y + (m0 + r) * n + n0;
      if (n0 + 16 <= n) {
#pragma GCC unroll 16
        for (int v = 0; v < VPB; ++v) storef(dst + v * W, t[r][j * VPB + v]);
      } else {
        alignas(64) float buf[16];
#pragma GCC unroll 16
        for (int v = 0; v < VPB; ++v) storef(buf + v * W, t[r][j * VPB + v]);
        std::memcpy(dst, buf, (n - n0) * sizeof(float));
      }
    }
}

template <int BITS, int MR>
void wo_tile_mr(int mr, int nr, const float* x, int64_t ldx, const uint8_t* w, int64_t ksn, int64_t k, int64_t gs,
                const float* scale, int64_t n, int64_t m0, int64_t nb0, float* y) {
  if constexpr (MR == 0) {
    (void)mr;
  } else if (mr == MR) {
    if constexpr (WO_NR == 2) {
      if (nr == 1) return wo_tile<BITS, MR, 1>(x, ldx, w, ksn, k, gs, scale, n, m0, nb0, y);
    }
    wo_tile<BITS, MR, WO_NR>(x, ldx, w, ksn, k, gs, scale, n, m0, nb0, y);
  } else {
    wo_tile_mr<BITS, MR - 1>(mr, nr, x, ldx, w, ksn, k, gs, scale, n, m0, nb0, y);
  }
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <int BITS>
ffi::Error WeightOnlyImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_packed,
                          ffi::Buffer<ffi::F32> scale, ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t k, int64_t n,
                          int64_t group_size) {
  constexpr int KS = WoStep<BITS>::KS;
  const auto xt = x.element_type();
  if (xt != ffi::F32 && xt != ffi::BF16) return ffi::Error::InvalidArgument("jquant weight-only: x must be f32/bf16");
  if (k <= 0 || n <= 0) return ffi::Error::InvalidArgument("jquant weight-only: k and n must be positive");
  const int64_t gs = group_size > 0 ? group_size : k;
  if (gs != k && gs % KS) return ffi::Error::InvalidArgument("jquant weight-only: group size not a multiple of step");
  const int64_t ksn = div_up(k, KS), nbn = div_up(n, 16), groups = div_up(k, gs);
  if (static_cast<int64_t>(x.element_count()) % k) return ffi::Error::InvalidArgument("jquant weight-only: bad x");
  const int64_t m = x.element_count() / k;
  if (static_cast<int64_t>(w_packed.size_bytes()) != nbn * ksn * 64)
    return ffi::Error::InvalidArgument(
        "jquant weight-only: packed weight size does not match (K, N) (only activations may carry vmap batch dims)");
  if (static_cast<int64_t>(scale.element_count()) != groups * n)
    return ffi::Error::InvalidArgument("jquant weight-only: scale must be (groups, N)");
  if (static_cast<int64_t>(y->element_count()) != m * n)
    return ffi::Error::InvalidArgument("jquant weight-only: output is not (M, N)");
  if (m == 0) return ffi::Error::Success();
  // f32 rows, zero padded to a multiple of KS (a copy only for bf16 or a ragged K).
  const float* xf = nullptr;
  int64_t ldx = k;
  std::unique_ptr<float[]> staged;
  if (xt == ffi::F32 && k % KS == 0) {
    xf = x.typed_data<float>();
  } else {
    ldx = ksn * KS;
    staged.reset(new float[m * ldx]);
    for (int64_t i = 0; i < m; ++i) {
      float* dst = staged.get() + i * ldx;
      if (xt == ffi::F32) {
        std::memcpy(dst, x.typed_data<float>() + i * k, k * sizeof(float));
      } else {
        const uint16_t* src = static_cast<const uint16_t*>(x.untyped_data()) + i * k;
        for (int64_t j = 0; j < k; ++j) dst[j] = bf16_to_f32(src[j]);
      }
      std::fill(dst + k, dst + ldx, 0.0f);
    }
    xf = staged.get();
  }
  const uint8_t* wp = static_cast<const uint8_t*>(w_packed.untyped_data());
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  const int64_t n_chunks = div_up(nbn, WO_NR);
  const int64_t m_tiles = div_up(m, WO_MR);
  auto item = [&](int64_t i) {
    const int64_t chunk = i % n_chunks, t = i / n_chunks;
    const int64_t nb0 = chunk * WO_NR, m0 = t * WO_MR;
    const int nr = static_cast<int>(std::min<int64_t>(WO_NR, nbn - nb0));
    const int mr = static_cast<int>(std::min<int64_t>(WO_MR, m - m0));
    wo_tile_mr<BITS, WO_MR>(mr, nr, xf, ldx, wp, ksn, k, gs, sp, n, m0, nb0, yp);
  };
  parallel_for(pool, n_chunks * m_tiles, item);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JqGemmS8, GemmS8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("out_kind")
                                  .Attr<bool>("relu")
                                  .Attr<bool>("has_bias")
                                  .Attr<int64_t>("qmin")
                                  .Attr<int64_t>("qmax"));

#define JQ_WEIGHT_ONLY(NAME, BITS)                                                                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, WeightOnlyImpl<BITS>,                                                 \
                                ffi::Ffi::Bind()                                                            \
                                    .Ctx<ffi::ThreadPool>()                                                 \
                                    .Arg<ffi::AnyBuffer>()                                                  \
                                    .Arg<ffi::AnyBuffer>()                                                  \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                           \
                                    .Ret<ffi::Buffer<ffi::F32>>()                                           \
                                    .Attr<int64_t>("k")                                                     \
                                    .Attr<int64_t>("n")                                                     \
                                    .Attr<int64_t>("group_size"));
JQ_WEIGHT_ONLY(JqWeightOnlyS8, 8)
JQ_WEIGHT_ONLY(JqWeightOnlyS4, 4)

// The instruction set this library was built for (checked by the loader against the running CPU).
extern "C" const char* jquant_kernels_isa() {
#if defined(JQ_ISA_AVX512VNNI)
  return "avx512vnni";
#elif defined(JQ_ISA_EMU512)
  return "emu512";
#elif defined(JQ_ISA_AVXVNNI)
  return "avxvnni";
#else
  return "avx2";
#endif
}
