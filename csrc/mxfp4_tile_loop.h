// The tile loop shared by the ISA translation units. Include it inside an anonymous namespace, after
// mxfp4_kernel.h, and instantiate run_tile<MK, RV, RM, TBM, KC> with a micro-kernel MK<R, TB> whose
//   static run(tile, r0, t0, g0, g1, part)
// computes rows r0..r0+R-1 for tokens t0..t0+TB-1 over blocks g0..g1-1, starting from zero when g0 == 0
// (else from the partial sums in `part`: R x TB vectors of 16 floats) and writing y when g1 == G (else
// storing the partial sums back to `part`).
//   RV:  rows per call when there is one token (the decode GEMV), 1..4; the whole row in one call
//   RM:  rows per call with several tokens, 1..2;  TBM: tokens per call, 1..8
//   KC:  blocks per pass with several tokens: the pass's inputs (TBM x KC x 128 bytes) stay in L1 while
//        every row of the tile goes by, instead of streaming TBM whole input rows from L2 for each row pair
// (No #includes here on purpose: every definition lands in the includer's anonymous namespace.)

constexpr int kMaxTileRows = 16;  // the driver never asks for more rows per tile with several tokens

template <template <int, int> class MK, int R>
inline void run_tokens(int64_t nt, const gptoss::Tile& t, int64_t r0, int64_t t0, int64_t g0, int64_t g1,
                       float* part) {
  switch (nt) {
    case 1: MK<R, 1>::run(t, r0, t0, g0, g1, part); break;
    case 2: MK<R, 2>::run(t, r0, t0, g0, g1, part); break;
    case 3: MK<R, 3>::run(t, r0, t0, g0, g1, part); break;
    case 4: MK<R, 4>::run(t, r0, t0, g0, g1, part); break;
    case 5: MK<R, 5>::run(t, r0, t0, g0, g1, part); break;
    case 6: MK<R, 6>::run(t, r0, t0, g0, g1, part); break;
    case 7: MK<R, 7>::run(t, r0, t0, g0, g1, part); break;
    default: MK<R, 8>::run(t, r0, t0, g0, g1, part); break;
  }
}

template <template <int, int> class MK, int RV, int RM, int TBM, int KC>
inline void run_tile(const gptoss::Tile& t) {
  static_assert(RV >= 1 && RV <= 4 && RM >= 1 && RM <= 2 && TBM >= 1 && TBM <= 8 && KC % 2 == 0, "tile shape");
  if (t.ntok == 1) {
    int64_t r = 0;
    for (; r + RV <= t.rows; r += RV) MK<RV, 1>::run(t, r, 0, 0, t.G, nullptr);
    for (; r < t.rows; ++r) MK<1, 1>::run(t, r, 0, 0, t.G, nullptr);
    return;
  }
  if (t.rows > kMaxTileRows) {  // (not used by the driver) split into tiles of kMaxTileRows rows
    for (int64_t r = 0; r < t.rows; r += kMaxTileRows) {
      gptoss::Tile sub = t;
      sub.w += r * t.G * 16, sub.s += r * t.G, sub.col0 += r;
      sub.rows = t.rows - r < kMaxTileRows ? t.rows - r : kMaxTileRows;
      run_tile<MK, RV, RM, TBM, KC>(sub);
    }
    return;
  }
  alignas(64) float part[kMaxTileRows * TBM * 16];
  for (int64_t t0 = 0; t0 < t.ntok; t0 += TBM) {
    const int64_t nt = t.ntok - t0 < TBM ? t.ntok - t0 : TBM;
    for (int64_t g0 = 0; g0 < t.G; g0 += KC) {
      const int64_t g1 = t.G - g0 < KC ? t.G : g0 + KC;
      int64_t r = 0;
      for (; r + RM <= t.rows; r += RM) run_tokens<MK, RM>(nt, t, r, t0, g0, g1, part + r * TBM * 16);
      for (; r < t.rows; ++r) run_tokens<MK, 1>(nt, t, r, t0, g0, g1, part + r * TBM * 16);
    }
  }
}
