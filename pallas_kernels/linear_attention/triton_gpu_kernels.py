"""Triton kernels of chunked gated linear attention (imported lazily by triton_gpu.py).

Layout: q, k, g [B, T, H, Dk], v, o [B, T, H, Dv] as the api takes them (token rows of
H * D values); `runs` and `continues` [B, Tp] int32 per token (Tp = T padded to the chunk):
the run index of the token's segment and 1 where that segment began before the token's
chunk. Per-chunk states [B*H, N, Dk, Dv] float32. One program handles one (batch*head,
chunk) or, for the sequential state passes, one (batch*head, Dk block, Dv block).

Numerics (see docs/linear_attention.md): every decay factor is exp of a sum of log decays
over exactly the tokens it spans (a cumsum from a chunk or sub-chunk start, a reverse
cumsum of the next tokens' g, or a masked sum), or a product of such factors, so no
exponent is ever positive and no sum is a difference of cumulative sums. Within a
sub-chunk the pairwise decays are built one query row at a time by multiplying the
previous row's by exp(g_t). Rows past T load as k = v = g = 0 (identity transitions).
"""

import triton
import triton.language as tl

LOG_DECAY_FLOOR = tl.constexpr(-1e30)


@triton.jit
def _dot(a, b, PRECISE: tl.constexpr):
  """a @ b accumulated in float32: for float32 inputs three tf32 passes (about float32
  accuracy), otherwise bf16 operands (the inputs' own precision)."""
  if PRECISE:
    return tl.dot(a, b, input_precision='tf32x3')
  return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def _tile(ptr, batch, head, rows, cols, T, H: tl.constexpr, D: tl.constexpr, row_limit):
  """float32 [rows, cols] of a [B, T, H, D] array; rows at or past row_limit (<= T) read 0."""
  offsets = ((batch * T + rows[:, None]).to(tl.int64) * H + head) * D + cols[None, :]
  return tl.load(ptr + offsets, mask=rows[:, None] < row_limit, other=0.0).to(tl.float32)


@triton.jit
def _row(ptr, batch, head, row, cols, T, H: tl.constexpr, D: tl.constexpr):
  """float32 [cols] of token `row` (0 past T)."""
  offsets = ((batch * T + row).to(tl.int64) * H + head) * D + cols
  return tl.load(ptr + offsets, mask=(cols < D) & (row < T), other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, value, batch, head, rows, cols, T, H: tl.constexpr, D: tl.constexpr):
  offsets = ((batch * T + rows[:, None]).to(tl.int64) * H + head) * D + cols[None, :]
  tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=rows[:, None] < T)


@triton.jit
def _log_decay(g):
  return tl.maximum(g, LOG_DECAY_FLOOR)


@triton.jit
def _next_tokens_decay(g_ptr, batch, head, rows, cols, last_row, T, H: tl.constexpr,
                       D: tl.constexpr):
  """[rows, cols]: sum of g over the tokens after each row up to last_row (exclusive of the
  row itself; 0 at last_row), as a reverse cumsum of the next token's g."""
  following = _log_decay(_tile(g_ptr, batch, head, rows + 1, cols, T, H, D, tl.minimum(last_row + 1, T)))
  following = tl.where((rows + 1 <= last_row)[:, None], following, 0.0)
  return tl.cumsum(following, axis=0, reverse=True)


@triton.jit
def _state_offsets(bh, n, N, k_cols, v_cols, DK: tl.constexpr, DV: tl.constexpr):
  return (bh * N + n).to(tl.int64) * (DK * DV) + k_cols[:, None] * DV + v_cols[None, :]


# ----------------------------------------------------------------------------------------
# forward


@triton.jit
def chunk_states_kernel(k_ptr, v_ptr, g_ptr, runs_ptr, continues_ptr, state0_ptr, T, TP, N, states_ptr, final_ptr,
                        H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        PRECISE: tl.constexpr):
  """Sequential over chunks: states[n] = the state entering chunk n; final = after the last."""
  bh, kb, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  batch, head = bh // H, bh % H
  k_cols = kb * BK + tl.arange(0, BK)
  v_cols = vb * BV + tl.arange(0, BV)
  local = tl.arange(0, C)
  state = tl.load(state0_ptr + _state_offsets(bh, 0, 1, k_cols, v_cols, DK, DV))
  for n in range(N):
    tl.store(states_ptr + _state_offsets(bh, n, N, k_cols, v_cols, DK, DV), state)
    rows = n * C + local
    k = _tile(k_ptr, batch, head, rows, k_cols, T, H, DK, T)
    v = _tile(v_ptr, batch, head, rows, v_cols, T, H, DV, T)
    g = _log_decay(_tile(g_ptr, batch, head, rows, k_cols, T, H, DK, T))
    runs = tl.load(runs_ptr + batch * TP + rows)
    last_run = tl.load(runs_ptr + batch * TP + n * C + C - 1)
    continues_last = tl.load(continues_ptr + batch * TP + n * C + C - 1).to(tl.float32)
    to_end = _next_tokens_decay(g_ptr, batch, head, rows, k_cols, n * C + C - 1, T, H, DK)
    k_to_end = tl.where((runs == last_run)[:, None], k * tl.exp(to_end), 0.0)
    chunk_decay = tl.exp(tl.sum(g, axis=0)) * continues_last
    state = chunk_decay[:, None] * state + _dot(tl.trans(k_to_end), v, PRECISE)
  tl.store(final_ptr + _state_offsets(bh, 0, 1, k_cols, v_cols, DK, DV), state)


@triton.jit
def chunk_output_kernel(q_ptr, k_ptr, v_ptr, g_ptr, runs_ptr, continues_ptr, states_ptr, T, TP, N, o_ptr,
                        H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                        C: tl.constexpr, SUB: tl.constexpr, BV: tl.constexpr,
                        SCALE: tl.constexpr, PRECISE: tl.constexpr):
  """o of one chunk (one Dv block): from the entering state, from earlier sub-chunks, within
  each sub-chunk."""
  n, bh, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  batch, head = bh // H, bh % H
  k_cols = tl.arange(0, DK)
  v_cols = vb * BV + tl.arange(0, BV)
  local = tl.arange(0, C)
  sub = tl.arange(0, SUB)
  chunk_rows = n * C + local
  chunk_runs = tl.load(runs_ptr + batch * TP + chunk_rows)
  state = tl.load(states_ptr + _state_offsets(bh, n, N, k_cols, v_cols, DK, DV))
  for i in tl.static_range(C // SUB):
    rows = n * C + i * SUB + sub
    q = _tile(q_ptr, batch, head, rows, k_cols, T, H, DK, T)
    g = _log_decay(_tile(g_ptr, batch, head, rows, k_cols, T, H, DK, T))
    runs = tl.load(runs_ptr + batch * TP + rows)
    continues = tl.load(continues_ptr + batch * TP + rows).to(tl.float32)
    prefix = tl.cumsum(g, axis=0)  # decay from the sub-chunk start, inclusive
    chunk_g = _log_decay(_tile(g_ptr, batch, head, chunk_rows, k_cols, T, H, DK, T))
    before = tl.sum(tl.where((local < i * SUB)[:, None], chunk_g, 0.0), axis=0)
    q_from_state = q * tl.exp(prefix + before[None, :]) * continues[:, None]
    o = _dot(q_from_state, state, PRECISE)
    if i > 0:
      gaps = _next_tokens_decay(g_ptr, batch, head, chunk_rows, k_cols, n * C + i * SUB - 1, T, H, DK)
      k = _tile(k_ptr, batch, head, chunk_rows, k_cols, T, H, DK, T)
      k_rel = tl.where((local < i * SUB)[:, None], k * tl.exp(gaps), 0.0)
      scores = _dot(q * tl.exp(prefix), tl.trans(k_rel), PRECISE)  # [SUB, C]
      scores = tl.where(runs[:, None] == chunk_runs[None, :], scores, 0.0)
      o += _dot(scores, _tile(v_ptr, batch, head, chunk_rows, v_cols, T, H, DV, T), PRECISE)
    k_sub = _tile(k_ptr, batch, head, rows, k_cols, T, H, DK, T)
    pair_decay = tl.zeros((SUB, DK), tl.float32)
    within = tl.zeros((SUB, SUB), tl.float32)
    for t in range(SUB):
      row = n * C + i * SUB + t
      g_t = _log_decay(_row(g_ptr, batch, head, row, k_cols, T, H, DK))
      q_t = _row(q_ptr, batch, head, row, k_cols, T, H, DK)
      pair_decay = tl.where((sub < t)[:, None], pair_decay * tl.exp(g_t)[None, :], tl.where((sub == t)[:, None],
                                                                                            1.0, 0.0))
      scores_t = tl.sum(k_sub * pair_decay * q_t[None, :], axis=1)  # [SUB] over keys
      within = tl.where((sub == t)[:, None], scores_t[None, :], within)
    within = tl.where(runs[:, None] == runs[None, :], within, 0.0)
    o += _dot(within, _tile(v_ptr, batch, head, rows, v_cols, T, H, DV, T), PRECISE)
    _store_tile(o_ptr, SCALE * o, batch, head, rows, v_cols, T, H, DV)


# ----------------------------------------------------------------------------------------
# backward


@triton.jit
def state_grads_kernel(q_ptr, do_ptr, g_ptr, continues_ptr, d_final_ptr, T, TP, N, d_states_ptr, d_state0_ptr,
                       H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       SCALE: tl.constexpr, PRECISE: tl.constexpr):
  """Sequential over chunks backwards: d_states[n] = gradient of the state leaving chunk n;
  d_state0 = gradient of the initial state."""
  bh, kb, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  batch, head = bh // H, bh % H
  k_cols = kb * BK + tl.arange(0, BK)
  v_cols = vb * BV + tl.arange(0, BV)
  local = tl.arange(0, C)
  d_state = tl.load(d_final_ptr + _state_offsets(bh, 0, 1, k_cols, v_cols, DK, DV))
  for back in range(N):
    n = N - 1 - back
    tl.store(d_states_ptr + _state_offsets(bh, n, N, k_cols, v_cols, DK, DV), d_state)
    rows = n * C + local
    q = _tile(q_ptr, batch, head, rows, k_cols, T, H, DK, T)
    d_o = _tile(do_ptr, batch, head, rows, v_cols, T, H, DV, T)
    g = _log_decay(_tile(g_ptr, batch, head, rows, k_cols, T, H, DK, T))
    continues = tl.load(continues_ptr + batch * TP + rows).to(tl.float32)
    continues_last = tl.load(continues_ptr + batch * TP + n * C + C - 1).to(tl.float32)
    q_from_state = q * tl.exp(tl.cumsum(g, axis=0)) * continues[:, None]
    chunk_decay = tl.exp(tl.sum(g, axis=0)) * continues_last
    d_state = chunk_decay[:, None] * d_state + SCALE * _dot(tl.trans(q_from_state), d_o, PRECISE)
  tl.store(d_state0_ptr + _state_offsets(bh, 0, 1, k_cols, v_cols, DK, DV), d_state)


@triton.jit
def _sub_chunk_decays(g_ptr, batch, head, n, i, rows, chunk_rows, local, cols, T, H: tl.constexpr,
                      D: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr):
  """For sub-chunk i's rows: (prefix, suffix, before, after): decay from the sub-chunk start
  to each row (inclusive), from each row (exclusive) to the sub-chunk end, and [cols] sums
  of g over the chunk's rows before and after the sub-chunk."""
  g = _log_decay(_tile(g_ptr, batch, head, rows, cols, T, H, D, T))
  suffix = _next_tokens_decay(g_ptr, batch, head, rows, cols, n * C + i * SUB + SUB - 1, T, H, D)
  chunk_g = _log_decay(_tile(g_ptr, batch, head, chunk_rows, cols, T, H, D, T))
  before = tl.sum(tl.where((local < i * SUB)[:, None], chunk_g, 0.0), axis=0)
  after = tl.sum(tl.where((local >= i * SUB + SUB)[:, None], chunk_g, 0.0), axis=0)
  return tl.cumsum(g, axis=0), suffix, before, after


@triton.jit
def _later_queries(q_ptr, g_ptr, batch, head, chunk_rows, local, first, cols, T, H: tl.constexpr,
                   D: tl.constexpr):
  """[C, cols]: q of the chunk's rows >= first scaled by their decay since `first` (0 before)."""
  later = (local >= first)[:, None]
  chunk_g = tl.where(later, _log_decay(_tile(g_ptr, batch, head, chunk_rows, cols, T, H, D, T)), 0.0)
  q = _tile(q_ptr, batch, head, chunk_rows, cols, T, H, D, T)
  return tl.where(later, q * tl.exp(tl.cumsum(chunk_g, axis=0)), 0.0)


@triton.jit
def chunk_dqk_kernel(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, runs_ptr, continues_ptr, states_ptr, d_states_ptr, T, TP, N,
                     dq_ptr, dk_ptr, dlog_ptr,
                     H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                     C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr,
                     SCALE: tl.constexpr, PRECISE: tl.constexpr):
  """dq, dk of one chunk (one Dk block), and dlog = q * dq - k * dk, the gradient of each
  token's cumulative log decay (its reverse cumsum per segment gives dg)."""
  n, bh, kb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  batch, head = bh // H, bh % H
  k_cols = kb * BK + tl.arange(0, BK)
  v_cols = tl.arange(0, DV)
  local = tl.arange(0, C)
  sub = tl.arange(0, SUB)
  chunk_rows = n * C + local
  chunk_runs = tl.load(runs_ptr + batch * TP + chunk_rows)
  last_run = tl.load(runs_ptr + batch * TP + n * C + C - 1)
  state = tl.load(states_ptr + _state_offsets(bh, n, N, k_cols, v_cols, DK, DV))  # [BK, DV]
  d_state = tl.load(d_states_ptr + _state_offsets(bh, n, N, k_cols, v_cols, DK, DV))
  for i in tl.static_range(C // SUB):
    rows = n * C + i * SUB + sub
    runs = tl.load(runs_ptr + batch * TP + rows)
    continues = tl.load(continues_ptr + batch * TP + rows).to(tl.float32)
    q = _tile(q_ptr, batch, head, rows, k_cols, T, H, DK, T)
    k = _tile(k_ptr, batch, head, rows, k_cols, T, H, DK, T)
    v = _tile(v_ptr, batch, head, rows, v_cols, T, H, DV, T)
    d_o = _tile(do_ptr, batch, head, rows, v_cols, T, H, DV, T)
    prefix, suffix, before, after = _sub_chunk_decays(g_ptr, batch, head, n, i, rows, chunk_rows, local, k_cols,
                                                      T, H, DK, C, SUB)
    # through the entering state and the leaving state
    dq = SCALE * continues[:, None] * tl.exp(prefix + before[None, :]) * _dot(d_o, tl.trans(state), PRECISE)
    dk = tl.where((runs == last_run)[:, None], tl.exp(suffix + after[None, :]), 0.0) * _dot(
        v, tl.trans(d_state), PRECISE)
    if i > 0:  # keys of earlier sub-chunks
      gaps = _next_tokens_decay(g_ptr, batch, head, chunk_rows, k_cols, n * C + i * SUB - 1, T, H, DK)
      chunk_k = _tile(k_ptr, batch, head, chunk_rows, k_cols, T, H, DK, T)
      k_rel = tl.where((local < i * SUB)[:, None], chunk_k * tl.exp(gaps), 0.0)
      d_scores = SCALE * _dot(d_o, tl.trans(_tile(v_ptr, batch, head, chunk_rows, v_cols, T, H, DV, T)), PRECISE)
      d_scores = tl.where((runs[:, None] == chunk_runs[None, :]) & (local < i * SUB)[None, :], d_scores, 0.0)
      dq += tl.exp(prefix) * _dot(d_scores, k_rel, PRECISE)
    if i < C // SUB - 1:  # queries of later sub-chunks
      q_rel = _later_queries(q_ptr, g_ptr, batch, head, chunk_rows, local, i * SUB + SUB, k_cols, T, H, DK)
      chunk_do = _tile(do_ptr, batch, head, chunk_rows, v_cols, T, H, DV, T)
      d_scores_t = SCALE * _dot(v, tl.trans(chunk_do), PRECISE)  # [SUB keys, C queries]
      d_scores_t = tl.where((runs[:, None] == chunk_runs[None, :]) & (local >= i * SUB + SUB)[None, :],
                            d_scores_t, 0.0)
      dk += tl.exp(suffix) * _dot(d_scores_t, q_rel, PRECISE)
    pair_decay = tl.zeros((SUB, BK), tl.float32)
    dq_within = tl.zeros((SUB, BK), tl.float32)
    for t in range(SUB):
      row = n * C + i * SUB + t
      g_t = _log_decay(_row(g_ptr, batch, head, row, k_cols, T, H, DK))
      q_t = _row(q_ptr, batch, head, row, k_cols, T, H, DK)
      do_t = _row(do_ptr, batch, head, row, v_cols, T, H, DV)
      run_t = tl.load(runs_ptr + batch * TP + row)
      pair_decay = tl.where((sub < t)[:, None], pair_decay * tl.exp(g_t)[None, :], tl.where((sub == t)[:, None],
                                                                                            1.0, 0.0))
      d_scores_row = SCALE * tl.sum(v * do_t[None, :], axis=1)  # [SUB] over keys
      d_scores_row = tl.where((sub <= t) & (runs == run_t), d_scores_row, 0.0)
      dq_t = tl.sum(d_scores_row[:, None] * k * pair_decay, axis=0)
      dq_within = tl.where((sub == t)[:, None], dq_t[None, :], dq_within)
      dk += d_scores_row[:, None] * q_t[None, :] * pair_decay
    dq += dq_within
    _store_tile(dq_ptr, dq, batch, head, rows, k_cols, T, H, DK)
    _store_tile(dk_ptr, dk, batch, head, rows, k_cols, T, H, DK)
    _store_tile(dlog_ptr, q * dq - k * dk, batch, head, rows, k_cols, T, H, DK)


@triton.jit
def chunk_dv_kernel(q_ptr, k_ptr, g_ptr, do_ptr, runs_ptr, d_states_ptr, T, TP, N, dv_ptr,
                    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                    C: tl.constexpr, SUB: tl.constexpr, BV: tl.constexpr,
                    SCALE: tl.constexpr, PRECISE: tl.constexpr):
  """dv of one chunk (one Dv block)."""
  n, bh, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  batch, head = bh // H, bh % H
  k_cols = tl.arange(0, DK)
  v_cols = vb * BV + tl.arange(0, BV)
  local = tl.arange(0, C)
  sub = tl.arange(0, SUB)
  chunk_rows = n * C + local
  chunk_runs = tl.load(runs_ptr + batch * TP + chunk_rows)
  last_run = tl.load(runs_ptr + batch * TP + n * C + C - 1)
  d_state = tl.load(d_states_ptr + _state_offsets(bh, n, N, k_cols, v_cols, DK, DV))  # [DK, BV]
  for i in tl.static_range(C // SUB):
    rows = n * C + i * SUB + sub
    runs = tl.load(runs_ptr + batch * TP + rows)
    k = _tile(k_ptr, batch, head, rows, k_cols, T, H, DK, T)
    prefix, suffix, before, after = _sub_chunk_decays(g_ptr, batch, head, n, i, rows, chunk_rows, local, k_cols,
                                                      T, H, DK, C, SUB)
    k_to_end = tl.where((runs == last_run)[:, None], k * tl.exp(suffix + after[None, :]), 0.0)
    dv = _dot(k_to_end, d_state, PRECISE)
    if i < C // SUB - 1:
      q_rel = _later_queries(q_ptr, g_ptr, batch, head, chunk_rows, local, i * SUB + SUB, k_cols, T, H, DK)
      scores_t = _dot(k * tl.exp(suffix), tl.trans(q_rel), PRECISE)  # [SUB keys, C queries]
      scores_t = tl.where((runs[:, None] == chunk_runs[None, :]) & (local >= i * SUB + SUB)[None, :], scores_t, 0.0)
      dv += SCALE * _dot(scores_t, _tile(do_ptr, batch, head, chunk_rows, v_cols, T, H, DV, T), PRECISE)
    pair_decay = tl.zeros((SUB, DK), tl.float32)
    for t in range(SUB):
      row = n * C + i * SUB + t
      g_t = _log_decay(_row(g_ptr, batch, head, row, k_cols, T, H, DK))
      q_t = _row(q_ptr, batch, head, row, k_cols, T, H, DK)
      do_t = _row(do_ptr, batch, head, row, v_cols, T, H, DV)
      run_t = tl.load(runs_ptr + batch * TP + row)
      pair_decay = tl.where((sub < t)[:, None], pair_decay * tl.exp(g_t)[None, :], tl.where((sub == t)[:, None],
                                                                                            1.0, 0.0))
      scores_row = tl.sum(k * pair_decay * q_t[None, :], axis=1)
      scores_row = tl.where((sub <= t) & (runs == run_t), scores_row, 0.0)
      dv += SCALE * scores_row[:, None] * do_t[None, :]
    _store_tile(dv_ptr, dv, batch, head, rows, v_cols, T, H, DV)


@triton.jit
def log_decay_grads_kernel(dlog_ptr, runs_ptr, continues_ptr, carry_ptr, T, TP, N, dg_ptr,
                           H: tl.constexpr, DK: tl.constexpr,
                           C: tl.constexpr, BK: tl.constexpr):
  """dg[u] = sum of dlog over the tokens t >= u of u's segment, plus (for the row's last
  segment) carry = rowsum(final state * its gradient): sequential over chunks backwards."""
  bh, kb = tl.program_id(0), tl.program_id(1)
  batch, head = bh // H, bh % H
  k_cols = kb * BK + tl.arange(0, BK)
  local = tl.arange(0, C)
  carry = tl.load(carry_ptr + bh * DK + k_cols)
  for back in range(N):
    n = N - 1 - back
    rows = n * C + local
    dlog = _tile(dlog_ptr, batch, head, rows, k_cols, T, H, DK, T)
    runs = tl.load(runs_ptr + batch * TP + rows)
    last_run = tl.load(runs_ptr + batch * TP + n * C + C - 1)
    continues_first = tl.load(continues_ptr + batch * TP + n * C)
    later_same_run = (local[None, :] >= local[:, None]) & (runs[:, None] == runs[None, :])  # [u, t]
    dg = _dot(later_same_run.to(tl.float32), dlog, True)
    dg += tl.where((runs == last_run)[:, None], carry[None, :], 0.0)
    _store_tile(dg_ptr, dg, batch, head, rows, k_cols, T, H, DK)
    carry = tl.where(continues_first != 0, tl.sum(tl.where((local == 0)[:, None], dg, 0.0), axis=0), 0.0)
