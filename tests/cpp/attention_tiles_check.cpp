// Host check of the attention tile walks (csrc/kernels/sparse_attention_tiles.cuh), built and run by
// tests/test_attention_tiles.py: the backward's inverse walk (key tile -> query tiles) visits exactly the pairs
// the forward walk (query tile -> key tiles) visits and covers every visible pair; the full-tile test and the
// per-key column masks agree with mask_visible (attention_mask.h) element by element. Exit status = failures.
#include <cstdio>
#include <set>
#include <vector>
#include "sparse_attention_tiles.cuh"
using namespace llama4::kernels;
int main() {
  long configs = 0, pairs = 0, fails = 0;
  const int Brs[] = {64, 16}, Bcs[] = {64, 16};
  for (int bi = 0; bi < 2; ++bi) {
    const int Br = Brs[bi], Bc = Bcs[bi];
    for (int causal = 0; causal < 2; ++causal)
      for (int window : {0, 1, 3, 17, 64, 65, 130})
        for (int chunk : {0, 1, 7, 64, 100})
          for (int gs : {0, 1, 5, 64, 150})
            for (int sinks : {0, 1, 4, 70})
              for (int Sq : {1, 5, 63, 64, 65, 200})
                for (int Sk : {0, 1, 7, 64, 129, 257}) {
                  if (Br == 16 && (Sq > 65 || Sk > 129)) continue;
                  AttentionMask m{causal != 0, window, chunk, gs, sinks};
                  ++configs;
                  const long nq = (Sq + Br - 1) / Br, nk = (Sk + Bc - 1) / Bc, off = Sk - Sq;
                  std::vector<std::vector<char>> fwd(nq, std::vector<char>(nk, 0));
                  for (long t = 0; t < nq; ++t) {
                    const long i0 = t * Br + off, i1 = std::min<long>((t + 1) * Br, Sq) + off;
                    KeyTileWalk w = make_key_tile_walk(m, i0, i1, Sk, Bc);
                    for (long n = next_key_tile(w, 0); n < w.end; n = next_key_tile(w, n + 1)) fwd[t][n] = 1;
                  }
                  for (long n = 0; n < nk; ++n) {
                    QueryTileWalk w = make_query_tile_walk(m, n, Sq, Sk, Br, Bc);
                    std::vector<char> inv(nq, 0);
                    long prev = -1;
                    for (long t = next_query_tile(w, 0); t < w.end; t = next_query_tile(w, t + 1)) {
                      if (t <= prev || t >= nq) {
                        ++fails;
                        break;
                      }
                      inv[t] = 1;
                      prev = t;
                    }
                    if (n * Bc < Sk)
                      for (long i0 = -Sq - 3; i0 < Sk + 3; ++i0)
                        for (long len : {1L, 2L, (long)Br})
                          if (query_tile_fully_visible(w, i0, i0 + len) !=
                              mask_tile_fully_visible(m, i0, i0 + len, n * Bc, n * Bc + Bc)) {
                            if (fails < 10) printf("FAIL full n%ld i0%ld len%ld\n", n, i0, len);
                            ++fails;
                          }
                    for (long t = 0; t < nq; ++t) {
                      ++pairs;
                      // any visible pair in (t, n)?
                      bool vis = false;
                      for (long r = t * Br; r < std::min<long>((t + 1) * Br, Sq); ++r)
                        for (long j = n * Bc; j < std::min<long>((n + 1) * Bc, Sk); ++j)
                          vis |= mask_visible(m, r + off, j);
                      if (inv[t] != fwd[t][n] || (vis && !inv[t])) {
                        if (fails < 10)
                          printf("FAIL Br%d c%d W%d C%d G%d s%d Sq%d Sk%d t%ld n%ld inv%d fwd%d vis%d\n", Br, causal,
                                 window, chunk, gs, sinks, Sq, Sk, t, n, inv[t], fwd[t][n], vis);
                        ++fails;
                      }
                    }
                  }
                  // per-column masks of one key over a query tile
                  for (long j = 0; j < Sk; ++j) {
                    KeyMaskTerms kt = key_mask_terms(m, j);
                    for (long i0 = -Sq - 3; i0 < Sk + 3; i0 += 11)
                      for (long rows : {1L, 7L, (long)Br}) {
                        KeyColumnMask cm = key_column_mask(m, kt, i0, rows);
                        for (int col = 0; col < Br + 2; ++col) {
                          const bool want = col < rows && mask_visible(m, i0 + col, j);
                          if (column_visible(cm, col) != want) {
                            if (fails < 10) printf("FAIL colmask j%ld i0%ld rows%ld col%d\n", j, i0, rows, col);
                            ++fails;
                          }
                        }
                      }
                  }
                  // shifted column masks: built over the whole sequence, shifted per query tile
                  for (long j = 0; j < Sk; ++j) {
                    KeyMaskTerms kt = key_mask_terms(m, j);
                    const long off = Sk - Sq;
                    KeyColumnMask whole = key_column_mask(m, kt, off, Sq);
                    for (long r0 = 0; r0 < Sq; r0 += Br) {
                      const long rows = std::min<long>(Br, Sq - r0);
                      KeyColumnMask cm = shift_column_mask(whole, (int32_t)r0, (int32_t)rows);
                      for (int col = 0; col < Br + 2; ++col)
                        if (column_visible(cm, col) != (col < rows && mask_visible(m, off + r0 + col, j))) {
                          if (fails < 10) printf("FAIL shifted j%ld r0%ld col%d\n", j, r0, col);
                          ++fails;
                        }
                    }
                  }
                  // per-element key terms
                  for (long j = 0; j < Sk; ++j) {
                    KeyMaskTerms kt = key_mask_terms(m, j);
                    for (long i = -Sq; i < Sk + 3; ++i)
                      if (query_visible(m, kt, i) != mask_visible(m, i, j)) {
                        if (fails < 10) printf("FAIL terms i%ld j%ld\n", i, j);
                        ++fails;
                      }
                  }
                }
  }
  printf("configs %ld tile pairs %ld fails %ld\n", configs, pairs, fails);
  return fails != 0;
}
