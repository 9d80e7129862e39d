"""Triton kernels of chunked gated linear attention (imported lazily by triton_gpu.py).

Layout: q, k, g [B, T, H, Dk], v, o [B, T, H, Dv] as the api takes them (token rows of
H * D values); `runs` and `continues` [B, Tp] int32 per token (Tp = T padded to the chunk):
the run index of the token's segment and 1 where that segment began before the token's
chunk. Per-chunk states [B*H, N, Dk, Dv] (float32, or bfloat16 where the matmuls take bf16
operands anyway). Intra-chunk scores A and their gradient dA [B, T, H, C]: row t, column s
= the (decayed, segment- and causally-masked) score of token t against key s of its chunk.

Numerics (see docs/linear_attention.md): every decay factor is exp of a sum of log decays
over exactly the tokens it spans (a cumsum from a chunk or sub-chunk start, a 0/1-mask
matmul over the later tokens of a tile, or a sum over whole sub-chunks), or a product of
such factors, so no exponent is ever positive and no sum is a difference of cumulative
sums. Within a sub-chunk the pairwise decays are built one query row at a time by
multiplying the previous row's by exp(g_t). Rows past T load as k = v = g = 0 (identity
transitions) and are never stored.
"""

import triton
import triton.language as tl

LOG_DECAY_FLOOR = tl.constexpr(-1e30)


@triton.jit
def _dot(a, b, PRECISE: tl.constexpr):
  """a @ b accumulated in float32: three tf32 passes on float32 operands (about float32
  accuracy), otherwise bf16 operands (the inputs' own precision)."""
  if PRECISE:
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision='tf32x3')
  return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def _offsets(batch, head, rows, cols, T, H: tl.constexpr, D: tl.constexpr):
  return ((batch * T + rows).to(tl.int64) * H + head) * D + cols


@triton.jit
def _tile(ptr, batch, head, rows, cols, T, H: tl.constexpr, D: tl.constexpr):
  """float32 [rows, cols] of a [B, T, H, D] array; rows at or past T read 0."""
  offsets = _offsets(batch, head, rows[:, None], cols[None, :], T, H, D)
  return tl.load(ptr + offsets, mask=rows[:, None] < T, other=0.0).to(tl.float32)


@triton.jit
def _operand(ptr, batch, head, rows, cols, T, H: tl.constexpr, D: tl.constexpr):
  """[rows, cols] in the array's own dtype, for a matmul operand (rows past T read 0)."""
  offsets = _offsets(batch, head, rows[:, None], cols[None, :], T, H, D)
  return tl.load(ptr + offsets, mask=rows[:, None] < T, other=0.0)


@triton.jit
def _row(ptr, batch, head, row, cols, T, H: tl.constexpr, D: tl.constexpr):
  """float32 [cols] of token `row` (0 past T)."""
  return tl.load(ptr + _offsets(batch, head, row, cols, T, H, D), mask=(cols < D) & (row < T),
                 other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, value, batch, head, rows, cols, T, H: tl.constexpr, D: tl.constexpr):
  offsets = _offsets(batch, head, rows[:, None], cols[None, :], T, H, D)
  tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=rows[:, None] < T)


@triton.jit
def _log_decay(g):
  return tl.maximum(g, LOG_DECAY_FLOOR)


@triton.jit
def _decays(ptr, batch, head, rows, cols, T, H: tl.constexpr, D: tl.constexpr):
  """Floored log decays [rows, cols] (0 past T)."""
  return _log_decay(_tile(ptr, batch, head, rows, cols, T, H, D))


@triton.jit
def _later_sums(g, ROWS: tl.constexpr):
  """[ROWS, cols]: sum of g over the rows after each row of the tile (0 at the last), as a
  0/1-mask matmul (so g is read once, and no sum is a difference)."""
  positions = tl.arange(0, ROWS)
  later = (positions[None, :] > positions[:, None]).to(tl.float32)
  return tl.dot(later, g, input_precision='tf32x3')


@triton.jit
def _state_offsets(bh, n, N, k_cols, v_cols, DK: tl.constexpr, DV: tl.constexpr):
  return (bh * N + n).to(tl.int64) * (DK * DV) + k_cols[:, None] * DV + v_cols[None, :]


# ----------------------------------------------------------------------------------------
# forward


@triton.jit
def decayed_qk_kernel(q_ptr, k_ptr, g_ptr, runs_ptr, continues_ptr, T, TP, N, q_from_state_ptr, k_to_end_ptr,
                      chunk_decay_ptr, H: tl.constexpr, DK: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
  """Per chunk (one Dk block), what the passes over the states read: q decayed since the
  chunk start (0 where the token's segment began in the chunk), k decayed to the chunk end
  (0 outside the chunk's last segment), both [B, T, H, Dk] in the dtype the matmuls round
  them to, and the chunk's decay exp(sum of g) [B*H, N, Dk] (0 where its last token's
  segment began in the chunk)."""
  n, bh, kb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  batch, head = bh // H, bh % H
  k_cols = kb * BK + tl.arange(0, BK)
  rows = n * C + tl.arange(0, C)
  g = _decays(g_ptr, batch, head, rows, k_cols, T, H, DK)
  continues = tl.load(continues_ptr + batch * TP + rows).to(tl.float32)
  q_from_state = _tile(q_ptr, batch, head, rows, k_cols, T, H, DK) * tl.exp(tl.cumsum(g, axis=0)) * continues[:, None]
  _store_tile(q_from_state_ptr, q_from_state, batch, head, rows, k_cols, T, H, DK)
  runs = tl.load(runs_ptr + batch * TP + rows)
  last_run = tl.load(runs_ptr + batch * TP + n * C + C - 1)
  k_to_end = tl.where((runs == last_run)[:, None], _tile(k_ptr, batch, head, rows, k_cols, T, H, DK) *
                      tl.exp(_later_sums(g, C)), 0.0)
  _store_tile(k_to_end_ptr, k_to_end, batch, head, rows, k_cols, T, H, DK)
  continues_last = tl.load(continues_ptr + batch * TP + n * C + C - 1).to(tl.float32)
  tl.store(chunk_decay_ptr + (bh * N + n).to(tl.int64) * DK + k_cols, tl.exp(tl.sum(g, axis=0)) * continues_last)


@triton.jit
def chunk_states_kernel(k_to_end_ptr, v_ptr, chunk_decay_ptr, state0_ptr, T, TP, N, states_ptr, final_ptr,
                        H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        PRECISE: tl.constexpr):
  """Sequential over chunks: states[n] = the state entering chunk n; final = after the last.
  Nothing but the state update is left in the loop, and its loads do not depend on the
  state, so they are issued ahead (num_stages)."""
  bh, kb, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  batch, head = bh // H, bh % H
  k_cols = kb * BK + tl.arange(0, BK)
  v_cols = vb * BV + tl.arange(0, BV)
  local = tl.arange(0, C)
  state = tl.load(state0_ptr + _state_offsets(bh, 0, 1, k_cols, v_cols, DK, DV))
  for n in range(N):
    tl.store(states_ptr + _state_offsets(bh, n, N, k_cols, v_cols, DK, DV), state.to(states_ptr.dtype.element_ty))
    rows = n * C + local
    k_to_end = _operand(k_to_end_ptr, batch, head, rows, k_cols, T, H, DK)
    v = _operand(v_ptr, batch, head, rows, v_cols, T, H, DV)
    chunk_decay = tl.load(chunk_decay_ptr + (bh * N + n).to(tl.int64) * DK + k_cols)
    state = chunk_decay[:, None] * state + _dot(tl.trans(k_to_end), v, PRECISE)
  tl.store(final_ptr + _state_offsets(bh, 0, 1, k_cols, v_cols, DK, DV), state)


@triton.jit
def chunk_scores_kernel(q_ptr, k_ptr, g_ptr, runs_ptr, T, TP, N, a_ptr,
                        H: tl.constexpr, DK: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr,
                        BK: tl.constexpr, PRECISE: tl.constexpr, UNROLL: tl.constexpr):
  """The rows of A of one sub-chunk i: against the keys of each earlier sub-chunk j (one
  matmul each), and within the sub-chunk (pairwise decays). Blocks right of the diagonal
  are not written (readers mask them). With BK < DK each program sums one Dk block's
  share, into its own part of A ([DK / BK, B, T, H, C]; the caller adds the parts)."""
  p, bh, kb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  n, i = p // (C // SUB), p % (C // SUB)
  batch, head = bh // H, bh % H
  a_ptr += (kb * tl.num_programs(1)).to(tl.int64) * T * C
  cols = kb * BK + tl.arange(0, BK)
  sub = tl.arange(0, SUB)
  rows = n * C + i * SUB + sub
  runs = tl.load(runs_ptr + batch * TP + rows)
  g = _decays(g_ptr, batch, head, rows, cols, T, H, DK)
  q_rel = _tile(q_ptr, batch, head, rows, cols, T, H, DK) * tl.exp(tl.cumsum(g, axis=0))
  between = tl.full((BK,), 1.0, tl.float32)  # decay over the sub-chunks between j and i
  for back in range(i):
    j = i - 1 - back
    key_rows = n * C + j * SUB + sub
    g_j = _decays(g_ptr, batch, head, key_rows, cols, T, H, DK)
    k_rel = _tile(k_ptr, batch, head, key_rows, cols, T, H, DK) * tl.exp(_later_sums(g_j, SUB)) * between[None, :]
    scores = _dot(q_rel, tl.trans(k_rel), PRECISE)
    key_runs = tl.load(runs_ptr + batch * TP + key_rows)
    scores = tl.where(runs[:, None] == key_runs[None, :], scores, 0.0)
    _store_tile(a_ptr, scores, batch, head, rows, j * SUB + sub, T, H, C)
    between *= tl.exp(tl.sum(g_j, axis=0))
  k = _tile(k_ptr, batch, head, rows, cols, T, H, DK)
  pair_decay = tl.zeros((SUB, BK), tl.float32)
  if UNROLL:  # the rows' loads can all be issued up front
    for t in tl.static_range(SUB):
      pair_decay = _scores_within_row(t, pair_decay, k, runs, q_ptr, g_ptr, runs_ptr, a_ptr, batch, head, n, i, cols,
                                      T, TP, H, DK, C, SUB)
  else:
    for t in range(SUB):
      pair_decay = _scores_within_row(t, pair_decay, k, runs, q_ptr, g_ptr, runs_ptr, a_ptr, batch, head, n, i, cols,
                                      T, TP, H, DK, C, SUB)


@triton.jit
def chunk_score_blocks_kernel(q_ptr, k_ptr, g_ptr, runs_ptr, T, TP, N, a_ptr,
                              H: tl.constexpr, DK: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr,
                              BK: tl.constexpr, PRECISE: tl.constexpr, UNROLL: tl.constexpr,
                              HALVES: tl.constexpr):
  """A in [SUB, SUB] blocks, one program per block (i, j) of a chunk, j <= i (programs
  right of the diagonal return at once), each looping over the Dk blocks: j < i one
  matmul per Dk block, j = i the pairwise decays row by row (HALVES: two rows a step,
  _scores_within_by_halves). Every program does one block's work, whatever its
  sub-chunk, and no float32 parts are summed afterwards."""
  p, bh = tl.program_id(0), tl.program_id(1)
  BLOCKS: tl.constexpr = C // SUB
  n, i, j = p // (BLOCKS * BLOCKS), (p // BLOCKS) % BLOCKS, p % BLOCKS
  if j > i:
    return
  batch, head = bh // H, bh % H
  sub = tl.arange(0, SUB)
  rows = n * C + i * SUB + sub
  runs = tl.load(runs_ptr + batch * TP + rows)
  key_rows = n * C + j * SUB + sub
  scores = tl.zeros((SUB, SUB), tl.float32)  # [queries, keys]
  if j < i:
    for kb in range(DK // BK):
      cols = kb * BK + tl.arange(0, BK)
      q_rel = _tile(q_ptr, batch, head, rows, cols, T, H, DK) * tl.exp(tl.cumsum(_decays(g_ptr, batch, head, rows,
                                                                                           cols, T, H, DK), axis=0))
      between = tl.zeros((BK,), tl.float32)  # log decay over the sub-chunks between j and i
      for m in range(j + 1, i):
        between += tl.sum(_decays(g_ptr, batch, head, n * C + m * SUB + sub, cols, T, H, DK), axis=0)
      g_j = _decays(g_ptr, batch, head, key_rows, cols, T, H, DK)
      k_rel = _tile(k_ptr, batch, head, key_rows, cols, T, H, DK) * tl.exp(_later_sums(g_j, SUB) + between[None, :])
      scores += _dot(q_rel, tl.trans(k_rel), PRECISE)
  elif HALVES:
    for kb in range(DK // BK):
      scores = _scores_within_by_halves(scores, q_ptr, k_ptr, g_ptr, batch, head, rows, kb * BK + tl.arange(0, BK), T,
                                        H, DK, SUB, PRECISE)
    scores = tl.where(sub[None, :] <= sub[:, None], scores, 0.0)
  else:
    for kb in range(DK // BK):
      cols = kb * BK + tl.arange(0, BK)
      k = _tile(k_ptr, batch, head, rows, cols, T, H, DK)
      pair_decay = tl.zeros((SUB, BK), tl.float32)
      if UNROLL:
        for t in tl.static_range(SUB):
          pair_decay, scores = _scores_within_row_sum(t, pair_decay, scores, k, q_ptr, g_ptr, batch, head,
                                                      n * C + i * SUB + t, cols, T, H, DK, SUB)
      else:
        for t in range(SUB):
          pair_decay, scores = _scores_within_row_sum(t, pair_decay, scores, k, q_ptr, g_ptr, batch, head,
                                                      n * C + i * SUB + t, cols, T, H, DK, SUB)
    scores = tl.where(sub[None, :] <= sub[:, None], scores, 0.0)
  key_runs = tl.load(runs_ptr + batch * TP + key_rows)
  scores = tl.where(runs[:, None] == key_runs[None, :], scores, 0.0)
  _store_tile(a_ptr, scores, batch, head, rows, j * SUB + sub, T, H, C)


@triton.jit
def _scores_within_by_halves(scores, q_ptr, k_ptr, g_ptr, batch, head, rows, cols, T,
                             H: tl.constexpr, DK: tl.constexpr, SUB: tl.constexpr, PRECISE: tl.constexpr):
  """Adds a diagonal block's scores over the Dk columns `cols` to `scores` [queries, keys]:
  the second half's queries against the first half's keys as one matmul (q decayed since
  the second half's start, k to the first half's end), and the two halves' own pairs in
  SUB / 2 steps, step r walking query row r against the first half's keys and row
  SUB / 2 + r against the second's at once."""
  HALF: tl.constexpr = SUB // 2
  sub = tl.arange(0, SUB)
  first = sub < HALF  # over key rows
  g = _decays(g_ptr, batch, head, rows, cols, T, H, DK)
  second_q = tl.where(first[:, None], 0.0, _tile(q_ptr, batch, head, rows, cols, T, H, DK) *
                      tl.exp(tl.cumsum(tl.where(first[:, None], 0.0, g), axis=0)))
  k = _tile(k_ptr, batch, head, rows, cols, T, H, DK)
  first_k = tl.where(first[:, None], k * tl.exp(_later_sums(tl.where(first[:, None], g, 0.0), SUB)), 0.0)
  scores += _dot(second_q, tl.trans(first_k), PRECISE)
  local = sub % HALF  # each key's place in its half
  pair_decay = tl.zeros_like(k)
  for r in range(HALF):
    query_of_key = tl.where(first, r, HALF + r)  # the query row each key row meets at this step
    query_rows = rows - sub + query_of_key
    g_query = _decays(g_ptr, batch, head, query_rows, cols, T, H, DK)
    pair_decay = tl.where((local < r)[:, None], pair_decay * tl.exp(g_query), tl.where((local == r)[:, None], 1.0, 0.0))
    step = tl.sum(k * pair_decay * _tile(q_ptr, batch, head, query_rows, cols, T, H, DK), axis=1)  # [keys]
    scores += tl.where(sub[:, None] == query_of_key[None, :], step[None, :], 0.0)
  return scores


@triton.jit
def _row_scores(t, pair_decay, k, q_ptr, g_ptr, batch, head, row, cols, T,
                H: tl.constexpr, DK: tl.constexpr, SUB: tl.constexpr):
  """(the pair decays to query row t, row t's scores [SUB] against the keys of its
  sub-chunk over the Dk columns `cols`), given the pair decays to row t - 1."""
  g_t = _log_decay(_row(g_ptr, batch, head, row, cols, T, H, DK))
  q_t = _row(q_ptr, batch, head, row, cols, T, H, DK)
  pair_decay = _pair_decay_to_row(t, pair_decay, g_t, SUB)
  return pair_decay, tl.sum(k * pair_decay * q_t[None, :], axis=1)


@triton.jit
def _scores_within_row_sum(t, pair_decay, scores, k, q_ptr, g_ptr, batch, head, row, cols, T,
                           H: tl.constexpr, DK: tl.constexpr, SUB: tl.constexpr):
  """Adds query row t's scores against the keys of its sub-chunk (over the Dk columns
  `cols`) to row t of `scores` [queries, keys]; returns the pair decays to row t and it."""
  sub = tl.arange(0, SUB)
  pair_decay, scores_t = _row_scores(t, pair_decay, k, q_ptr, g_ptr, batch, head, row, cols, T, H, DK, SUB)
  return pair_decay, scores + tl.where((sub == t)[:, None], scores_t[None, :], 0.0)


@triton.jit
def _pair_decay_to_row(t, pair_decay, g_t, SUB: tl.constexpr):
  """The decays from each key s of the sub-chunk to query row t, given those to row t - 1:
  times exp(g_t) for s < t, 1 at s = t, 0 after."""
  sub = tl.arange(0, SUB)
  return tl.where((sub < t)[:, None], pair_decay * tl.exp(g_t)[None, :], tl.where((sub == t)[:, None], 1.0, 0.0))


@triton.jit
def _scores_within_row(t, pair_decay, k, runs, q_ptr, g_ptr, runs_ptr, a_ptr, batch, head, n, i, cols, T, TP,
                       H: tl.constexpr, DK: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr):
  """Stores query row t's scores against the keys of its own sub-chunk (over the Dk
  columns `cols`); returns the pair decays to row t."""
  sub = tl.arange(0, SUB)
  row = n * C + i * SUB + t
  run_t = tl.load(runs_ptr + batch * TP + row)
  pair_decay, scores_t = _row_scores(t, pair_decay, k, q_ptr, g_ptr, batch, head, row, cols, T, H, DK, SUB)
  scores_t = tl.where((sub <= t) & (runs == run_t), scores_t, 0.0)
  tl.store(a_ptr + _offsets(batch, head, row, i * SUB + sub, T, H, C), scores_t.to(a_ptr.dtype.element_ty),
           mask=(sub < SUB) & (row < T))
  return pair_decay


@triton.jit
def _chunk_scores(a_ptr, batch, head, rows, local, T, H: tl.constexpr, C: tl.constexpr):
  """A of the chunk's rows [C queries, C keys], 0 right of the diagonal, in A's dtype."""
  offsets = _offsets(batch, head, rows[:, None], local[None, :], T, H, C)
  return tl.load(a_ptr + offsets, mask=(rows[:, None] < T) & (local[None, :] <= local[:, None]), other=0.0)


@triton.jit
def chunk_output_kernel(q_from_state_ptr, v_ptr, states_ptr, a_ptr, T, TP, N, o_ptr,
                        H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, SCALE: tl.constexpr, PRECISE: tl.constexpr):
  """o of one chunk (one Dv block): the decayed q against the entering state (a loop over Dk
  blocks), plus A @ v."""
  n, bh, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  batch, head = bh // H, bh % H
  v_cols = vb * BV + tl.arange(0, BV)
  local = tl.arange(0, C)
  rows = n * C + local
  o = tl.zeros((C, BV), tl.float32)
  for kb in range(DK // BK):
    k_cols = kb * BK + tl.arange(0, BK)
    q_from_state = _operand(q_from_state_ptr, batch, head, rows, k_cols, T, H, DK)
    o += _dot(q_from_state, tl.load(states_ptr + _state_offsets(bh, n, N, k_cols, v_cols, DK, DV)), PRECISE)
  scores = _chunk_scores(a_ptr, batch, head, rows, local, T, H, C)
  o += _dot(scores, _operand(v_ptr, batch, head, rows, v_cols, T, H, DV), PRECISE)
  _store_tile(o_ptr, SCALE * o, batch, head, rows, v_cols, T, H, DV)


# ----------------------------------------------------------------------------------------
# backward


@triton.jit
def state_grads_kernel(q_from_state_ptr, do_ptr, chunk_decay_ptr, states_ptr, final_ptr, d_final_ptr, T, TP, N,
                       d_states_ptr, d_state0_ptr, carries_ptr,
                       H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       SCALE: tl.constexpr, PRECISE: tl.constexpr):
  """Sequential over chunks backwards: d_states[n] = gradient of the state leaving chunk n;
  d_state0 = gradient of the initial state; carries[bh, n, Dv block] = this block's share of
  rowsum(state leaving chunk n * its gradient), the gradient of a log decay inserted after
  chunk n (= the sum of dlog over the later tokens of chunk n's last segment, and the final
  state's share when that segment ends the row)."""
  bh, kb, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  batch, head = bh // H, bh % H
  k_cols = kb * BK + tl.arange(0, BK)
  v_cols = vb * BV + tl.arange(0, BV)
  local = tl.arange(0, C)
  everywhere = (k_cols[:, None] < DK) & (v_cols[None, :] < DV)
  d_state = tl.load(d_final_ptr + _state_offsets(bh, 0, 1, k_cols, v_cols, DK, DV))
  for back in range(N):
    n = N - 1 - back
    tl.store(d_states_ptr + _state_offsets(bh, n, N, k_cols, v_cols, DK, DV),
             d_state.to(d_states_ptr.dtype.element_ty))
    leaving = tl.load(states_ptr + _state_offsets(bh, n + 1, N, k_cols, v_cols, DK, DV), mask=everywhere & (n + 1 < N),
                      other=0.0).to(tl.float32)
    leaving += tl.load(final_ptr + _state_offsets(bh, 0, 1, k_cols, v_cols, DK, DV), mask=everywhere & (n + 1 == N),
                       other=0.0)
    carry_offsets = ((bh * N + n) * tl.num_programs(2) + vb).to(tl.int64) * DK + k_cols
    tl.store(carries_ptr + carry_offsets, tl.sum(leaving * d_state, axis=1))
    rows = n * C + local
    q_from_state = _operand(q_from_state_ptr, batch, head, rows, k_cols, T, H, DK)
    d_o = _operand(do_ptr, batch, head, rows, v_cols, T, H, DV)
    chunk_decay = tl.load(chunk_decay_ptr + (bh * N + n).to(tl.int64) * DK + k_cols)
    d_state = chunk_decay[:, None] * d_state + SCALE * _dot(tl.trans(q_from_state), d_o, PRECISE)
  tl.store(d_state0_ptr + _state_offsets(bh, 0, 1, k_cols, v_cols, DK, DV), d_state)


@triton.jit
def chunk_dscores_kernel(v_ptr, do_ptr, runs_ptr, T, TP, N, da_ptr,
                         H: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                         SCALE: tl.constexpr, PRECISE: tl.constexpr):
  """dA of one chunk: SCALE * do @ v^T over the visible pairs (same segment, key <= query),
  0 elsewhere; float32."""
  n, bh = tl.program_id(0), tl.program_id(1)
  batch, head = bh // H, bh % H
  local = tl.arange(0, C)
  rows = n * C + local
  runs = tl.load(runs_ptr + batch * TP + rows)
  d_scores = tl.zeros((C, C), tl.float32)
  for vb in range(DV // BV):
    v_cols = vb * BV + tl.arange(0, BV)
    d_o = _operand(do_ptr, batch, head, rows, v_cols, T, H, DV)
    d_scores += _dot(d_o, tl.trans(_operand(v_ptr, batch, head, rows, v_cols, T, H, DV)), PRECISE)
  visible = (local[None, :] <= local[:, None]) & (runs[:, None] == runs[None, :])
  _store_tile(da_ptr, tl.where(visible, SCALE * d_scores, 0.0), batch, head, rows, local, T, H, C)


@triton.jit
def chunk_dqk_kernel(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, runs_ptr, continues_ptr, states_ptr, d_states_ptr, da_ptr,
                     T, TP, N, dq_ptr, dk_ptr, dlog_ptr,
                     H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, SCALE: tl.constexpr, PRECISE: tl.constexpr,
                     UNROLL: tl.constexpr, TWO_WALKS: tl.constexpr):
  """dq, dk of one sub-chunk i (one Dk block), and dlog = q * dq - k * dk, the gradient of
  each token's cumulative log decay (its reverse cumsum per segment gives dg). Within the
  sub-chunk: one walk over its query rows (TWO_WALKS=0: dq's terms summed across the tile
  at each row), or two walks, keys backwards for dq and queries forwards for dk, that only
  accumulate [SUB, BK] tiles."""
  p, bh, kb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  n, i = p // (C // SUB), p % (C // SUB)
  batch, head = bh // H, bh % H
  k_cols = kb * BK + tl.arange(0, BK)
  sub = tl.arange(0, SUB)
  rows = n * C + i * SUB + sub
  runs = tl.load(runs_ptr + batch * TP + rows)
  continues = tl.load(continues_ptr + batch * TP + rows).to(tl.float32)
  last_run = tl.load(runs_ptr + batch * TP + n * C + C - 1)
  g = _decays(g_ptr, batch, head, rows, k_cols, T, H, DK)
  q = _tile(q_ptr, batch, head, rows, k_cols, T, H, DK)
  k = _tile(k_ptr, batch, head, rows, k_cols, T, H, DK)
  # keys of earlier sub-chunks; `before` ends as the decay over the chunk's rows before i
  dq = tl.zeros((SUB, BK), tl.float32)
  before = tl.full((BK,), 1.0, tl.float32)
  for back in range(i):
    j = i - 1 - back
    key_rows = n * C + j * SUB + sub
    g_j = _decays(g_ptr, batch, head, key_rows, k_cols, T, H, DK)
    k_rel = _tile(k_ptr, batch, head, key_rows, k_cols, T, H, DK) * tl.exp(_later_sums(g_j, SUB)) * before[None, :]
    dq += _dot(_tile(da_ptr, batch, head, rows, j * SUB + sub, T, H, C), k_rel, PRECISE)
    before *= tl.exp(tl.sum(g_j, axis=0))
  # queries of later sub-chunks; `after` ends as the decay over the chunk's rows after i
  dk = tl.zeros((SUB, BK), tl.float32)
  after = tl.full((BK,), 1.0, tl.float32)
  for j in range(i + 1, C // SUB):
    query_rows = n * C + j * SUB + sub
    g_j = _decays(g_ptr, batch, head, query_rows, k_cols, T, H, DK)
    q_rel = _tile(q_ptr, batch, head, query_rows, k_cols, T, H, DK) * tl.exp(tl.cumsum(g_j, axis=0)) * after[None, :]
    d_scores_t = tl.trans(_tile(da_ptr, batch, head, query_rows, i * SUB + sub, T, H, C))  # [keys, queries]
    dk += _dot(d_scores_t, q_rel, PRECISE)
    after *= tl.exp(tl.sum(g_j, axis=0))
  # through the entering and the leaving state
  from_state = tl.zeros((SUB, BK), tl.float32)
  to_state = tl.zeros((SUB, BK), tl.float32)
  for vb in range(DV // BV):
    v_cols = vb * BV + tl.arange(0, BV)
    state = tl.load(states_ptr + _state_offsets(bh, n, N, k_cols, v_cols, DK, DV))
    d_state = tl.load(d_states_ptr + _state_offsets(bh, n, N, k_cols, v_cols, DK, DV))
    from_state += _dot(_operand(do_ptr, batch, head, rows, v_cols, T, H, DV), tl.trans(state), PRECISE)
    to_state += _dot(_operand(v_ptr, batch, head, rows, v_cols, T, H, DV), tl.trans(d_state), PRECISE)
  dq = tl.exp(tl.cumsum(g, axis=0)) * (dq + SCALE * continues[:, None] * before[None, :] * from_state)
  dk = tl.exp(_later_sums(g, SUB)) * (dk + tl.where((runs == last_run)[:, None], after[None, :] * to_state, 0.0))
  if TWO_WALKS:
    dq_within, dk_within = _grads_within_two_walks(k, q_ptr, k_ptr, g_ptr, da_ptr, batch, head, n * C + i * SUB,
                                                   i * SUB, k_cols, T, H, DK, C, SUB, UNROLL)
  else:
    # within the sub-chunk, one query row t at a time; accumulated apart from dq and dk so the
    # loop keeps one layout, and dA's diagonal block read once ([keys, queries])
    d_scores_block = tl.trans(_tile(da_ptr, batch, head, rows, i * SUB + sub, T, H, C))
    pair_decay = tl.zeros((SUB, BK), tl.float32)
    dq_within = tl.zeros((SUB, BK), tl.float32)
    dk_within = tl.zeros((SUB, BK), tl.float32)
    if UNROLL:
      for t in tl.static_range(SUB):
        pair_decay, dq_within, dk_within = _grads_within_row(t, pair_decay, dq_within, dk_within, d_scores_block, k,
                                                             q_ptr, g_ptr, batch, head, n * C + i * SUB + t, k_cols, T,
                                                             H, DK, SUB)
    else:
      for t in range(SUB):
        pair_decay, dq_within, dk_within = _grads_within_row(t, pair_decay, dq_within, dk_within, d_scores_block, k,
                                                             q_ptr, g_ptr, batch, head, n * C + i * SUB + t, k_cols, T,
                                                             H, DK, SUB)
  dq += dq_within
  dk += dk_within
  _store_tile(dq_ptr, dq, batch, head, rows, k_cols, T, H, DK)
  _store_tile(dk_ptr, dk, batch, head, rows, k_cols, T, H, DK)
  _store_tile(dlog_ptr, q * dq - k * dk, batch, head, rows, k_cols, T, H, DK)


@triton.jit
def chunk_dv_kernel(k_to_end_ptr, do_ptr, d_states_ptr, a_ptr, T, TP, N, dv_ptr,
                    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, SCALE: tl.constexpr, PRECISE: tl.constexpr):
  """dv of one chunk (one Dv block): SCALE * A^T @ do, plus the keys decayed to the chunk
  end against the leaving state's gradient (a loop over Dk blocks)."""
  n, bh, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  batch, head = bh // H, bh % H
  v_cols = vb * BV + tl.arange(0, BV)
  local = tl.arange(0, C)
  rows = n * C + local
  scores_t = tl.trans(_chunk_scores(a_ptr, batch, head, rows, local, T, H, C))  # [keys, queries]
  dv = SCALE * _dot(scores_t, _operand(do_ptr, batch, head, rows, v_cols, T, H, DV), PRECISE)
  for kb in range(DK // BK):
    k_cols = kb * BK + tl.arange(0, BK)
    k_to_end = _operand(k_to_end_ptr, batch, head, rows, k_cols, T, H, DK)
    dv += _dot(k_to_end, tl.load(d_states_ptr + _state_offsets(bh, n, N, k_cols, v_cols, DK, DV)), PRECISE)
  _store_tile(dv_ptr, dv, batch, head, rows, v_cols, T, H, DV)


@triton.jit
def _grads_within_row(t, pair_decay, dq_within, dk_within, d_scores_block, k, q_ptr, g_ptr, batch, head, row, k_cols, T,
                      H: tl.constexpr, DK: tl.constexpr, SUB: tl.constexpr):
  """Query row t's part of dq and dk within its own sub-chunk (d_scores_block [keys,
  queries]); returns the pair decays to row t and the two sums."""
  sub = tl.arange(0, SUB)
  g_t = _log_decay(_row(g_ptr, batch, head, row, k_cols, T, H, DK))
  q_t = _row(q_ptr, batch, head, row, k_cols, T, H, DK)
  d_scores = tl.sum(tl.where((sub == t)[None, :], d_scores_block, 0.0), axis=1)  # [SUB] over keys, 0 past t
  pair_decay = _pair_decay_to_row(t, pair_decay, g_t, SUB)
  dq_t = tl.sum(d_scores[:, None] * k * pair_decay, axis=0)
  dq_within = tl.where((sub == t)[:, None], dq_t[None, :], dq_within)
  dk_within += d_scores[:, None] * q_t[None, :] * pair_decay
  return pair_decay, dq_within, dk_within


@triton.jit
def _grads_within_two_walks(k, q_ptr, k_ptr, g_ptr, da_ptr, batch, head, first_row, first_col, k_cols, T,
                            H: tl.constexpr, DK: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr,
                            UNROLL: tl.constexpr):
  """dq and dk [SUB, BK] of a sub-chunk against itself without sums across the tile: dk over
  the query rows t forwards (the decays from every key to row t, as _pair_decay_to_row),
  dq over the key rows s backwards (the decays from key s to every query, the previous
  key's times exp(g) of the token after s). dA's row t and column s are read from memory;
  k is the sub-chunk's tile (for the shape and layout)."""
  pair_decay = tl.zeros_like(k)  # [keys, BK]: decay from each key to the current query
  dk_within = tl.zeros_like(k)
  key_decay = tl.zeros_like(k)  # [queries, BK]: decay from the current key to each query
  dq_within = tl.zeros_like(k)
  if UNROLL:
    for t in tl.static_range(SUB):
      pair_decay, dk_within = _dk_within_step(t, pair_decay, dk_within, q_ptr, g_ptr, da_ptr, batch, head, first_row,
                                              first_col, k_cols, T, H, DK, C, SUB)
    for back in tl.static_range(SUB):
      key_decay, dq_within = _dq_within_step(SUB - 1 - back, key_decay, dq_within, k_ptr, g_ptr, da_ptr, batch, head,
                                             first_row, first_col, k_cols, T, H, DK, C, SUB)
  else:
    for t in range(SUB):
      pair_decay, dk_within = _dk_within_step(t, pair_decay, dk_within, q_ptr, g_ptr, da_ptr, batch, head, first_row,
                                              first_col, k_cols, T, H, DK, C, SUB)
    for back in range(SUB):
      key_decay, dq_within = _dq_within_step(SUB - 1 - back, key_decay, dq_within, k_ptr, g_ptr, da_ptr, batch, head,
                                             first_row, first_col, k_cols, T, H, DK, C, SUB)
  return dq_within, dk_within


@triton.jit
def _dk_within_step(t, pair_decay, dk_within, q_ptr, g_ptr, da_ptr, batch, head, first_row, first_col, k_cols, T,
                    H: tl.constexpr, DK: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr):
  """Query row t's terms of dk: dA[t, s] * q_t * decay(s -> t) for every key s <= t."""
  sub = tl.arange(0, SUB)
  row = first_row + t
  g_t = _log_decay(_row(g_ptr, batch, head, row, k_cols, T, H, DK))
  q_t = _row(q_ptr, batch, head, row, k_cols, T, H, DK)
  d_scores = tl.load(da_ptr + _offsets(batch, head, row, first_col + sub, T, H, C), mask=(sub <= t) & (row < T),
                     other=0.0)  # [keys]
  pair_decay = _pair_decay_to_row(t, pair_decay, g_t, SUB)
  return pair_decay, dk_within + d_scores[:, None] * q_t[None, :] * pair_decay


@triton.jit
def _dq_within_step(s, key_decay, dq_within, k_ptr, g_ptr, da_ptr, batch, head, first_row, first_col, k_cols, T,
                    H: tl.constexpr, DK: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr):
  """Key row s's terms of dq: dA[t, s] * k_s * decay(s -> t) for every query t >= s, given
  the decays from key s + 1 (times exp(g) of token s + 1, which they span besides)."""
  sub = tl.arange(0, SUB)
  row = first_row + s
  g_next = _log_decay(_row(g_ptr, batch, head, row + 1, k_cols, T, H, DK))
  g_next = tl.where(s + 1 < SUB, g_next, 0.0)
  k_s = _row(k_ptr, batch, head, row, k_cols, T, H, DK)
  d_scores = tl.load(da_ptr + _offsets(batch, head, first_row + sub, first_col + s, T, H, C),
                     mask=(sub >= s) & (first_row + sub < T), other=0.0)  # [queries]
  key_decay = tl.where((sub > s)[:, None], key_decay * tl.exp(g_next)[None, :], tl.where((sub == s)[:, None], 1.0, 0.0))
  return key_decay, dq_within + d_scores[:, None] * k_s[None, :] * key_decay


@triton.jit
def log_decay_grads_kernel(dlog_ptr, runs_ptr, carries_ptr, T, TP, N, dg_ptr,
                           H: tl.constexpr, DK: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
  """dg[u] = sum of dlog over the tokens t >= u of u's segment in u's chunk, plus, for the
  chunk's last segment, the carry (that sum over the later chunks, and the final state's
  share: computed by state_grads_kernel). Parallel over chunks."""
  n, bh, kb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  batch, head = bh // H, bh % H
  k_cols = kb * BK + tl.arange(0, BK)
  local = tl.arange(0, C)
  rows = n * C + local
  runs = tl.load(runs_ptr + batch * TP + rows)
  last_run = tl.load(runs_ptr + batch * TP + n * C + C - 1)
  later_same_run = (local[None, :] >= local[:, None]) & (runs[:, None] == runs[None, :])  # [u, t]
  dg = _dot(later_same_run.to(tl.float32), _tile(dlog_ptr, batch, head, rows, k_cols, T, H, DK), True)
  carry = tl.load(carries_ptr + (bh * N + n).to(tl.int64) * DK + k_cols)
  dg += tl.where((runs == last_run)[:, None], carry[None, :], 0.0)
  _store_tile(dg_ptr, dg, batch, head, rows, k_cols, T, H, DK)
