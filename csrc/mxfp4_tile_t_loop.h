// The tile loop of the transposed product (dx = W^T dy), shared by the ISA translation units like
// mxfp4_tile_loop.h: include it inside an anonymous namespace, after mxfp4_kernel.h, and instantiate
// run_tile_t<MKT, KV, KB, TBM, NC> with a micro-kernel MKT<B, TB> whose
//   static run(tile, n0, n1, t0, g)
// adds the contribution of rows n0..n1-1 to blocks g..g+B-1 of tokens t0..t0+TB-1: it starts from zero when
// n0 == 0, else from the partial sums it left in dx (in a layout of its own choosing), and it leaves the final
// k-ordered values in dx when n1 == rows. Each weight block is decoded once per call and used for TB tokens.
//   KV:  blocks per call when there is one token (the decode GEMV): enough independent accumulators to hide the
//        FMA latency, 1..4
//   KB:  blocks per call with several tokens;  TBM: tokens per call, 1..8
//   NC:  rows per pass: the pass's weights (NC rows x the tile's blocks) and dy (NC x ntok) stay in L1 while
//        every token and block of the tile goes by; the partial sums wait in dx between passes
// (No #includes here on purpose: every definition lands in the includer's anonymous namespace.)

template <template <int, int> class MK, int B, int TB>
inline void run_tokens_t(int64_t nt, const gptoss::TTile& t, int64_t n0, int64_t n1, int64_t t0, int64_t g) {
  if constexpr (TB > 1) {
    if (nt < TB) return run_tokens_t<MK, B, TB - 1>(nt, t, n0, n1, t0, g);
  }
  MK<B, TB>::run(t, n0, n1, t0, g);
}

template <template <int, int> class MK, int KV, int KB, int TBM, int NC>
inline void run_tile_t(const gptoss::TTile& t) {
  static_assert(KV >= 1 && KV <= 4 && KB >= 1 && KB <= 4 && TBM >= 1 && TBM <= 8 && NC >= 1, "tile shape");
  for (int64_t n0 = 0; n0 < t.rows; n0 += NC) {
    const int64_t n1 = t.rows - n0 < NC ? t.rows : n0 + NC;
    if (t.ntok == 1) {
      int64_t g = t.g0;
      for (; g + KV <= t.g1; g += KV) MK<KV, 1>::run(t, n0, n1, 0, g);
      if (KV > 2 && g + 2 <= t.g1) MK<(KV > 2 ? 2 : 1), 1>::run(t, n0, n1, 0, g), g += 2;
      for (; g < t.g1; ++g) MK<1, 1>::run(t, n0, n1, 0, g);
      continue;
    }
    for (int64_t t0 = 0; t0 < t.ntok; t0 += TBM) {
      const int64_t nt = t.ntok - t0 < TBM ? t.ntok - t0 : TBM;
      int64_t g = t.g0;
      for (; g + KB <= t.g1; g += KB) run_tokens_t<MK, KB, TBM>(nt, t, n0, n1, t0, g);
      for (; g < t.g1; ++g) run_tokens_t<MK, 1, TBM>(nt, t, n0, n1, t0, g);
    }
  }
}
