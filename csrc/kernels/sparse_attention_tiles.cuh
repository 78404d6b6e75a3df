// Key-tile scheduling for the sparse-global attention kernels: which key tiles one query tile
// visits, which of those need no per-element mask, and the per-element mask with its per-query
// terms hoisted. Host+device inline functions with no CUDA header, so a host test can check
// them exhaustively against attention_mask.h: the walk visits exactly the tiles that
// mask_tile_may_be_visible() accepts (never skipping a visible key), tile_fully_visible() equals
// mask_tile_fully_visible(), and key_visible() equals mask_visible().
// Legend: a query tile holds positions [i0, i1); key tile n holds positions [n*Bc, (n+1)*Bc)
// clipped to [0, Sk).
#pragma once

#include <cstdint>

#include "attention_mask.h"

namespace llama4::kernels {

// The walk over one query tile's key tiles, with every per-query-tile quantity hoisted out of
// the key loop: each pattern is one range of tiles (sinks, window, chunk) or the tiles holding a
// multiple of the global stride, and tiles >= end can hold no visible key (the causal bound, or
// the end of the keys). Stepping to the next tile is then a few compares and, with a global
// stride, one division: never a scan over all Sk / Bc tiles, and no per-tile division by the
// chunk or window.
struct KeyTileWalk {
  int64_t end;                 // one past the last tile that may hold a visible key
  bool dense;                  // no pattern: every tile below end
  int64_t sink_end;            // tiles [0, sink_end) hold a sink
  int64_t window_lo;           // tiles [window_lo, end) hold a key within some query's window
  int64_t chunk_lo, chunk_hi;  // tiles [chunk_lo, chunk_hi) hold a key sharing a query's chunk
  int64_t global_stride;       // > 0: tiles holding a multiple of it (below seqlen_k)
  int64_t seqlen_k;
  int64_t block_n;  // keys per tile
  // Key bounds under which a whole tile [j0, j1) is visible to every query of the query tile
  // (tile_fully_visible(); the same answer as mask_tile_fully_visible() without its divisions).
  int64_t full_causal_hi;                // causal: j1 - 1 <= i0
  int64_t full_window_lo;                // window: j0 >= i1 - W (INT64_MAX without a window)
  int64_t full_chunk_lo, full_chunk_hi;  // chunk: [j0, j1) inside the one chunk of all the queries
  int64_t full_sinks;                    // sinks: j1 <= sinks
};

LLAMA4_ATTN_HD int64_t tile_ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;  // a >= 0, b > 0
}

// The walk for queries at positions [i0, i1) over keys [0, seqlen_k) in tiles of block_n keys.
LLAMA4_ATTN_HD KeyTileWalk make_key_tile_walk(const AttentionMask& m, int64_t i0, int64_t i1, int64_t seqlen_k,
                                              int64_t block_n) {
  KeyTileWalk w{0, true, 0, 0, 0, 0, 0, seqlen_k, block_n, INT64_MAX, INT64_MAX, 0, 0, 0};
  if (i1 <= i0 || seqlen_k <= 0) return w;  // end = 0: nothing to visit
  if (m.causal) w.full_causal_hi = i0;
  if (m.window > 0) w.full_window_lo = i1 - m.window;
  if (m.chunk > 0 && floor_div(i0, m.chunk) == floor_div(i1 - 1, m.chunk)) {
    w.full_chunk_lo = floor_div(i0, m.chunk) * m.chunk;
    w.full_chunk_hi = w.full_chunk_lo + m.chunk;
  }
  if (m.sinks > 0) w.full_sinks = m.sinks;
  int64_t end = tile_ceil_div(seqlen_k, block_n);
  if (m.causal) {
    const int64_t last_key = i1 - 1;  // the last query sees keys up to its own position
    if (last_key < 0) return w;
    const int64_t causal_end = last_key / block_n + 1;
    end = causal_end < end ? causal_end : end;
  }
  w.end = end;
  w.dense = !mask_has_pattern(m);
  w.window_lo = end;  // empty ranges unless the pattern is set
  if (m.sinks > 0) w.sink_end = tile_ceil_div(m.sinks, block_n);
  if (m.window > 0) {
    // i - j < W for some i >= i0 needs j >= i0 - W + 1; every later key up to the causal bound.
    const int64_t lo_key = i0 - m.window + 1;
    w.window_lo = lo_key > 0 ? lo_key / block_n : 0;
  }
  if (m.chunk > 0) {
    // Keys sharing a chunk with some query: chunks floor(i0 / C) .. floor((i1 - 1) / C).
    const int64_t lo_key = floor_div(i0, m.chunk) * m.chunk;
    const int64_t hi_key = (floor_div(i1 - 1, m.chunk) + 1) * m.chunk;  // exclusive
    if (hi_key > 0) {
      w.chunk_lo = lo_key > 0 ? lo_key / block_n : 0;
      w.chunk_hi = tile_ceil_div(hi_key, block_n);
    }
  }
  if (m.global_stride > 0) w.global_stride = m.global_stride;
  return w;
}

// Lowers `best` to the first tile >= t of the tile range [lo, hi).
LLAMA4_ATTN_HD void walk_consider_range(int64_t lo, int64_t hi, int64_t t, int64_t& best) {
  if (lo >= hi || t >= hi) return;
  const int64_t first = lo > t ? lo : t;
  if (first < best) best = first;
}

// Smallest tile n >= t that may hold a visible key (w.end when none). The visited tiles are a
// superset of the tiles with a visible pair (a visible pair needs the causal bound, n < end, and
// one pattern, whose set then holds the key's tile), and for queries at real positions (< Sk)
// exactly the tiles that mask_tile_may_be_visible() accepts (both checked by brute force).
LLAMA4_ATTN_HD int64_t next_key_tile(const KeyTileWalk& w, int64_t t) {
  if (t < 0) t = 0;
  if (t >= w.end) return w.end;
  if (w.dense) return t;
  int64_t best = w.end;
  walk_consider_range(0, w.sink_end, t, best);
  walk_consider_range(w.window_lo, w.end, t, best);
  walk_consider_range(w.chunk_lo, w.chunk_hi, t, best);
  if (w.global_stride > 0 && best > t) {
    // The first global key in tile t or later; a multiple past the last key is no candidate.
    const int64_t key = tile_ceil_div(t * w.block_n, w.global_stride) * w.global_stride;
    if (key < w.seqlen_k && key / w.block_n < best) best = key / w.block_n;
  }
  return best < w.end ? best : w.end;
}

// The per-query terms of mask_visible(), hoisted out of the key loop so that the per-element
// test is compares only: mask_visible(m, i, j) == key_visible(m, query_mask_terms(m, i), j, ...).
struct QueryMaskTerms {
  int64_t i;                   // the query's position
  int64_t window_lo;           // keys >= window_lo satisfy i - j < W
  int64_t chunk_lo, chunk_hi;  // keys [chunk_lo, chunk_hi) share the query's chunk
};

LLAMA4_ATTN_HD QueryMaskTerms query_mask_terms(const AttentionMask& m, int64_t i) {
  QueryMaskTerms q{i, INT64_MAX, 0, 0};
  if (m.window > 0) q.window_lo = i - m.window + 1;
  if (m.chunk > 0) {
    q.chunk_lo = floor_div(i, m.chunk) * m.chunk;
    q.chunk_hi = q.chunk_lo + m.chunk;
  }
  return q;
}

// First multiple of the global stride >= j0 (j0 >= 0; INT64_MAX without a stride): one division
// per key tile instead of one per key.
LLAMA4_ATTN_HD int64_t first_global_key(const AttentionMask& m, int64_t j0) {
  return m.global_stride > 0 ? tile_ceil_div(j0, m.global_stride) * m.global_stride : INT64_MAX;
}

// Is key j visible to every query, as a sink or a global key? first_global is first_global_key()
// of the tile holding j (so that j - first_global < Bc < 2^32 when j >= first_global).
LLAMA4_ATTN_HD bool key_visible_to_all(const AttentionMask& m, int64_t j, int64_t first_global) {
  if (m.sinks > 0 && j < m.sinks) return true;
  if (m.global_stride <= 0 || j < first_global) return false;
  const int64_t d = j - first_global;
  if (d < m.global_stride) return d == 0;  // the common case (stride > tile): no division at all
  return static_cast<uint32_t>(d) % static_cast<uint32_t>(m.global_stride) == 0u;
}

// mask_visible(m, q.i, j) given q = query_mask_terms(m, i) and to_all = key_visible_to_all(...).
LLAMA4_ATTN_HD bool key_visible(const AttentionMask& m, const QueryMaskTerms& q, int64_t j, bool to_all) {
  if (m.causal && j > q.i) return false;
  if (!mask_has_pattern(m)) return true;
  return to_all || j >= q.window_lo || (j >= q.chunk_lo && j < q.chunk_hi);
}

// Is every key in [j0, j1) visible to every query in [i0, i1)? Conservative the other way from
// mask_tile_may_be_visible (may say no for a fully visible tile, never yes for a tile with an
// invisible pair): such tiles skip the per-element mask, which is most of the interior tiles.
LLAMA4_ATTN_HD bool mask_tile_fully_visible(const AttentionMask& m, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  if (i1 <= i0 || j1 <= j0) return true;      // no pair at all
  if (m.causal && j1 - 1 > i0) return false;  // the last key must not be after the first query
  if (!mask_has_pattern(m)) return true;
  if (m.sinks > 0 && j1 <= m.sinks) return true;
  if (m.window > 0 && (i1 - 1) - j0 < m.window) return true;  // the farthest pair is within the window
  if (m.chunk > 0) {
    const int64_t c = floor_div(i0, m.chunk);
    if (floor_div(i1 - 1, m.chunk) == c && floor_div(j0, m.chunk) == c && floor_div(j1 - 1, m.chunk) == c) return true;
  }
  if (m.global_stride == 1) return true;  // every key is a global key
  return false;
}

// mask_tile_fully_visible(m, i0, i1, j0, j1) for the walk's query tile, by compares only.
LLAMA4_ATTN_HD bool tile_fully_visible(const KeyTileWalk& w, int64_t j0, int64_t j1) {
  if (j1 - 1 > w.full_causal_hi) return false;
  if (w.dense) return true;
  return j1 <= w.full_sinks || j0 >= w.full_window_lo || (j0 >= w.full_chunk_lo && j1 <= w.full_chunk_hi) ||
         w.global_stride == 1;
}

// ---- the inverse walk (the backward's dK/dV kernel): which query tiles visit one key tile ------
// Query tile t holds rows [t*Br, min((t+1)*Br, Sq)) at positions i = row + Sk - Sq. The forward's
// walk from query tile t visits key tile n iff n is below the walk's causal bound and in one
// pattern's tile set; each of those conditions, solved for t, is a bound on t (i0 and i1 grow
// with t), so the query tiles that visit key tile n are [lo, end) when every query may see the
// tile (no pattern, a sink or a global key in it), else [lo, end) intersected with
// [0, window_hi) U [chunk_lo, chunk_hi): at most two ranges, found once per key tile. The host
// check proves it the exact inverse of next_key_tile() (query tile t visits key tile n in one
// walk iff t visits n in the other), so dK/dV sums exactly the score tiles the forward computed.
struct QueryTileWalk {
  int64_t lo;                  // causal: the first tile whose last query is at or after the tile's first key
  int64_t end;                 // one past the last query tile (0 when nothing can visit the key tile)
  bool all;                    // every tile in [lo, end)
  int64_t window_hi;           // tiles [0, window_hi) hold a query within the window of one of the keys
  int64_t chunk_lo, chunk_hi;  // tiles [chunk_lo, chunk_hi) hold a query sharing a chunk with one of the keys
  // Query bounds under which every query of [i0, i1) sees every key of the whole tile [j0, j0 + Bc)
  // (query_tile_fully_visible(); mask_tile_fully_visible() without its divisions, which would be calls in
  // the kernel's loop).
  int64_t full_causal_lo;                // causal: i0 >= j0 + Bc - 1 (INT64_MIN without)
  bool full_all;                         // no pattern, the tile is all sinks, or every key is global
  int64_t full_window_hi;                // window: i1 - 1 < j0 + W (INT64_MIN without a window)
  int64_t full_chunk_lo, full_chunk_hi;  // chunk: [i0, i1) inside the one chunk holding the whole key tile
};

// The inverse walk for key tile n (keys [n*Bc, min((n+1)*Bc, Sk))) over Sq queries in tiles of block_m.
LLAMA4_ATTN_HD QueryTileWalk make_query_tile_walk(const AttentionMask& m, int64_t n, int64_t seqlen_q, int64_t seqlen_k,
                                                  int64_t block_m, int64_t block_n) {
  QueryTileWalk w{0, 0, true, 0, 0, 0, INT64_MIN, false, INT64_MIN, 0, 0};
  const int64_t j0 = n * block_n;
  if (seqlen_q <= 0 || seqlen_k <= 0 || n < 0 || j0 >= seqlen_k) return w;  // end = 0: nothing to visit
  const int64_t j1_tile = j0 + block_n;                        // the walk's tile bounds are not clipped to Sk
  const int64_t j1 = j1_tile < seqlen_k ? j1_tile : seqlen_k;  // the keys that exist
  const int64_t offset = seqlen_k - seqlen_q;                  // position of query row r: r + offset
  w.end = tile_ceil_div(seqlen_q, block_m);
  // Causal: the forward's bound end = (i1 - 1) / Bc + 1 > n, i.e. the tile's last query i1 - 1 >= j0; the last
  // row of tile t is min(t*Br + Br, Sq) - 1, and Sq - 1 + offset = Sk - 1 >= j0 always.
  if (m.causal) {
    const int64_t lo = floor_div(j0 - offset, block_m);
    w.lo = lo > 0 ? lo : 0;
  }
  w.all = !mask_has_pattern(m) || (m.sinks > 0 && j0 < m.sinks) || first_global_key(m, j0) < j1;
  if (m.window > 0) {
    // The forward's window_lo = max(i0 - W + 1, 0) / Bc <= n  <=>  i0 <= (n + 1)*Bc + W - 2.
    const int64_t hi = floor_div(j1_tile + m.window - 2 - offset, block_m) + 1;
    w.window_hi = hi < 0 ? 0 : (hi > w.end ? w.end : hi);
  }
  if (m.chunk > 0) {
    // n >= chunk_lo = max(floor(i0 / C)*C, 0) / Bc  <=>  i0 < ceil((n + 1)*Bc / C)*C, and
    // n < chunk_hi = ceil((floor((i1 - 1) / C) + 1)*C / Bc)  <=>  i1 - 1 >= floor(j0 / C)*C.
    const int64_t hi = floor_div(tile_ceil_div(j1_tile, m.chunk) * m.chunk - 1 - offset, block_m) + 1;
    const int64_t lo = floor_div(floor_div(j0, m.chunk) * m.chunk - offset, block_m);
    w.chunk_lo = lo > 0 ? lo : 0;
    w.chunk_hi = hi < 0 ? 0 : (hi > w.end ? w.end : hi);
  }
  if (m.causal) w.full_causal_lo = j1_tile - 1;
  w.full_all = !mask_has_pattern(m) || (m.sinks > 0 && j1_tile <= m.sinks) || m.global_stride == 1;
  if (m.window > 0) w.full_window_hi = j0 + m.window;
  if (m.chunk > 0 && floor_div(j0, m.chunk) == floor_div(j1_tile - 1, m.chunk)) {
    w.full_chunk_lo = floor_div(j0, m.chunk) * m.chunk;
    w.full_chunk_hi = w.full_chunk_lo + m.chunk;
  }
  return w;
}

// mask_tile_fully_visible(m, i0, i1, j0, j0 + Bc) for the walk's whole key tile, by compares only.
LLAMA4_ATTN_HD bool query_tile_fully_visible(const QueryTileWalk& w, int64_t i0, int64_t i1) {
  if (i0 < w.full_causal_lo) return false;
  return w.full_all || i1 - 1 < w.full_window_hi || (i0 >= w.full_chunk_lo && i1 <= w.full_chunk_hi);
}

// Smallest query tile t' >= t that visits the walk's key tile (w.end when none).
LLAMA4_ATTN_HD int64_t next_query_tile(const QueryTileWalk& w, int64_t t) {
  if (t < w.lo) t = w.lo;
  if (t >= w.end) return w.end;
  if (w.all) return t;
  int64_t best = w.end;
  walk_consider_range(0, w.window_hi, t, best);
  walk_consider_range(w.chunk_lo, w.chunk_hi, t, best);
  return best;
}

// The per-key terms of mask_visible(), hoisted out of the query loop (the dK/dV kernel holds two
// keys per thread and sweeps queries): query_visible(m, key_mask_terms(m, j), i) == mask_visible(m, i, j)
// by compares only. The chunk test is symmetric (i and j share a chunk), and i - j < W is i < j + W.
struct KeyMaskTerms {
  int64_t j;                   // the key's position
  int64_t window_hi;           // queries < window_hi satisfy i - j < W (INT64_MIN without a window)
  int64_t chunk_lo, chunk_hi;  // queries [chunk_lo, chunk_hi) share the key's chunk
  bool to_all;                 // a sink or a global key: visible to every query (the causal bound aside)
};

LLAMA4_ATTN_HD KeyMaskTerms key_mask_terms(const AttentionMask& m, int64_t j) {
  KeyMaskTerms k{j, INT64_MIN, 0, 0, false};
  if (m.window > 0) k.window_hi = j + m.window;
  if (m.chunk > 0) {
    k.chunk_lo = floor_div(j, m.chunk) * m.chunk;
    k.chunk_hi = k.chunk_lo + m.chunk;
  }
  k.to_all = (m.sinks > 0 && j < m.sinks) || (m.global_stride > 0 && j >= 0 && j % m.global_stride == 0);
  return k;
}

// mask_visible(m, i, k.j) given k = key_mask_terms(m, j).
LLAMA4_ATTN_HD bool query_visible(const AttentionMask& m, const KeyMaskTerms& k, int64_t i) {
  if (m.causal && k.j > i) return false;
  if (!mask_has_pattern(m)) return true;
  return k.to_all || i < k.window_hi || (i >= k.chunk_lo && i < k.chunk_hi);
}

// One key's visibility over the columns [0, rows) of a query tile at positions i0 + col, as int compares
// (the dK/dV kernel's per-element mask): column_visible(key_column_mask(m, key_mask_terms(m, j), i0, rows), col)
// == (col < rows && mask_visible(m, i0 + col, j)) for every col >= 0. The bounds are clamped to [-1, rows], so
// int32 suffices however far apart the positions are (rows < 2^31).
struct KeyColumnMask {
  int32_t lo;                  // columns >= lo pass the causal bound (and are real rows: < hi)
  int32_t hi;                  // columns < hi are real query rows
  int32_t window_hi;           // columns < window_hi are within the window
  int32_t chunk_lo, chunk_hi;  // columns [chunk_lo, chunk_hi) share the key's chunk
  bool to_all;                 // no pattern, or a sink / global key
};

LLAMA4_ATTN_HD int32_t clamp_column(int64_t c, int64_t rows) {
  return static_cast<int32_t>(c < -1 ? -1 : (c > rows ? rows : c));
}

LLAMA4_ATTN_HD KeyColumnMask key_column_mask(const AttentionMask& m, const KeyMaskTerms& k, int64_t i0, int64_t rows) {
  KeyColumnMask c{0, clamp_column(rows, rows), -1, 0, 0, k.to_all || !mask_has_pattern(m)};
  if (m.causal) c.lo = clamp_column(k.j - i0, rows);
  if (m.window > 0) c.window_hi = clamp_column(k.window_hi - i0, rows);
  if (m.chunk > 0) {
    c.chunk_lo = clamp_column(k.chunk_lo - i0, rows);
    c.chunk_hi = clamp_column(k.chunk_hi - i0, rows);
  }
  return c;
}

// The same mask for the sub-tile of columns [r0, r0 + rows) of `c`, renumbered from 0: built once per key over a
// whole sequence (i0 = the position of row 0, rows = Sq), then shifted per query tile with int32 arithmetic only.
// Exact because the clamped bounds preserve every comparison with a column in [0, rows of c).
LLAMA4_ATTN_HD int32_t shift_column(int32_t x, int32_t r0, int32_t rows) {
  const int32_t c = x - r0;  // x in [-1, Sq], r0 in [0, Sq): no overflow
  return c < -1 ? -1 : (c > rows ? rows : c);
}

LLAMA4_ATTN_HD KeyColumnMask shift_column_mask(const KeyColumnMask& c, int32_t r0, int32_t rows) {
  return {shift_column(c.lo, r0, rows),       shift_column(c.hi, r0, rows),       shift_column(c.window_hi, r0, rows),
          shift_column(c.chunk_lo, r0, rows), shift_column(c.chunk_hi, r0, rows), c.to_all};
}

LLAMA4_ATTN_HD bool column_visible(const KeyColumnMask& c, int32_t col) {
  return col >= c.lo && col < c.hi && (c.to_all || col < c.window_hi || (col >= c.chunk_lo && col < c.chunk_hi));
}

}  // namespace llama4::kernels
