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

}  // namespace llama4::kernels
