"""The mechanisms of the shipped comparison suites, each at its paper's settings scaled to
the suite's training length L (configs/compare/*.py use them; docs/compare.md explains
every choice). Each arm is (name, {model field: value}), changes to the suite's run.

  dense      every layer dense causal attention (the reference).
  window     a causal window of L/8 keys at every layer (the sparse layers' span of the
             others, so they are comparable).
  masformer  MASFormer (Zhang et al., 2023): the top layer of every `hybrid_every` dense,
             a window of L/8 below; the paper keeps a few full layers and a short span
             elsewhere.
  gated      SeerAttention (Gao et al., 2024): learned block gates, 64-token blocks, top-k
             density 0.25 of the causal blocks (the paper reports 50-90% sparsity at
             8k-32k; at our shorter rows 0.25 keeps the same order of blocks per query);
             gate width 64 (the paper's equals the head dim, 128; ours is 64); gates
             distilled from the dense map during training.
  dma        Dynamic Mask Attention (Shi et al., 2025): each query keeps its top-w past
             keys by a learned score, w = L/8 (Doge uses w = 2048 at 8k, L/4; we use the
             window's L/8 so that dma, window and masformer keep the same number of keys).
  routing    Routing Transformer (Roy et al., 2020): half the heads local (window L/8),
             half routed among K = L/512 clusters (at least 2; the paper sets K = L/w
             with a 512-token cluster window), shared QK, causal selection.
  sse_h      SSE-H (Pan et al., 2025): sparse state expansion, N = 4 partitions, top-2,
             in every layer but the top layer of every `hybrid_every`, which is dense
             (the paper's SSE-H keeps a fraction of softmax layers).
  gla_h      the same hybrid with plain gated linear attention (sse:1, no shared branch):
             the linear-attention baseline of the SSE paper.
  strided    Sparse Transformer (Child et al., 2019): the strided pattern at block
             granularity with a stride of L/8 tokens: the window arm's span as the local
             part, plus every L/8-th block back (the paper takes the stride near sqrt(L)
             tokens; block kernels skip only whole blocks, so ours is a block multiple).
             Not in the shipped suites' lists yet: name it there to run it.
  moba       MoBA (Lu et al., 2025): mean-pooled key blocks of L/16 tokens, each query
             block attends its own block and the top 2 others (top_k 3), a GQA group
             sharing the choice: the paper's scaling-law setting (block 512, top-3 at
             8k) scaled to L, at most 3L/16 keys per query.
  infllm_v2  InfLLM-V2 (Zhao et al., 2025): no new parameters; 64-token selection
             blocks scored by each query's softmax over mean-pooled 32-token key spans
             (stride 16), its GQA group sharing the choice; L/8 keys per query (the
             window's): the document's first block, 2 local blocks and the best others;
             sparse at the suite's length (the paper switches to sparse above a length).
  nsa        Native Sparse Attention (Yuan et al., 2025): gated compression, selection
             and window branches; compressed keys of 32 tokens every 16 and 64-token
             selection blocks (the paper's), the top L/512 blocks (at least 3: the
             first and 2 local ones; the paper's 16 at L = 8192, 1/8 of the row) and a
             window of min(512, L/8) tokens (the paper's 512; the window arm's span at
             shorter rows). phi is `weighted` (a learned weight per span position):
             the paper's linear map, 2 x 32 x 64 x 64 per kv head and layer, would be
             2.1M of the suite model's 3.05M parameters.
  power      PowerAttention (Chen et al., 2025): the key blocks at power-of-two block
             distances plus the query's own 64-token block (the paper's block form,
             docs/static_patterns.md): about 64 (1 + log2(L / 64)) keys per query,
             reaching the whole row in log depth.
  neighborhood  dilated causal neighborhood attention (DiNAT): layers that attend the
             last L/16 keys of the query's group of every 4th token (a span of L/4 with
             half the window arm's keys) alternate with plain neighborhood layers, the
             last L/16 keys (a window; DiNAT's NA/DiNA alternation, here the dilated
             layers first). Dilated layers alone never mix tokens of different groups.
  fixed      Sparse Transformer's fixed pattern: chunks of L/8 tokens, the last 8 of
             each chunk (c = 8, the paper's with stride 128) seen by later queries.
  radial     Radial Attention (Li et al., 2025) over frames of 64 tokens.
  bigbird    BigBird (Zaheer et al., 2020) in the suite's 64-token blocks: the block
             before the query's and its own, 2 global blocks and 3 random earlier
             blocks per query block (the paper's 3 window + 2 global + 3 random).
             radial is per token: it visits most tiles, so its step time is near a
             dense layer's (docs/static_patterns.md); the neighborhood layer gathers
             its dilation groups and the fixed layer its summary keys, and both visit
             about the tiles they use.
"""

from sparseformer.config import base_config

ARM_NAMES = ('dense', 'window', 'masformer', 'gated', 'dma', 'routing', 'sse_h', 'gla_h', 'strided', 'moba',
             'infllm_v2', 'nsa', 'power', 'neighborhood', 'fixed', 'radial', 'bigbird')


def paper_arms(seq_len, *, names=ARM_NAMES, hybrid_every=4, gate_density=0.25, gate_width=64, cluster_window=512):
  """The arms named, in `names` order, for training rows of `seq_len` tokens."""
  window = f'window:{max(seq_len // 8, 64)}'
  hybrid = {'model.attention.alternate_kind': 'dense', 'model.attention.alternate_layers': f'every:{hybrid_every}'}
  arms = {
      'dense': {'model.attention.kind': 'dense'},
      'window': {'model.attention.kind': window},
      'masformer': {'model.attention.kind': window, **hybrid},
      'gated': {'model.attention.kind': 'gated', 'model.attention.gate.density': gate_density,
                'model.attention.gate.width': gate_width},
      'dma': {'model.attention.kind': f'dynamic_mask:{max(seq_len // 8, 64)}'},
      'routing': {'model.attention.kind': f'routing:{max(seq_len // cluster_window, 2)}',
                  'model.attention.routing.local_window': max(seq_len // 8, 64)},
      'sse_h': {'model.attention.kind': 'sse:4', 'model.attention.sse.top_k': 2,
                'model.attention.sse.mode': 'varlen', **hybrid},
      'gla_h': {'model.attention.kind': 'sse:1', 'model.attention.sse.top_k': 1,
                'model.attention.sse.shared': False, **hybrid},
      'strided': {'model.attention.kind': f'strided:{max(seq_len // 8, 64)}'},
      'moba': {'model.attention.kind': 'moba', 'model.attention.moba.block': max(seq_len // 16, 64),
               'model.attention.moba.top_k': 3},
      'infllm_v2': {'model.attention.kind': 'infllm_v2', 'model.attention.infllm_v2.sparse_from': seq_len,
                    'model.attention.infllm_v2.select_count': max(seq_len // 8 // 64, 3)},
      'nsa': {'model.attention.kind': 'nsa', 'model.attention.nsa.select_count': max(seq_len // 512, 3),
              'model.attention.nsa.window': min(512, seq_len // 8), 'model.attention.nsa.compression': 'weighted'},
      'power': {'model.attention.kind': 'power:64'},
      'neighborhood': {'model.attention.kind': f'neighborhood:{max(seq_len // 16, 16)}',
                       'model.attention.neighborhood.dilation': 4,
                       'model.attention.alternate_kind': f'window:{max(seq_len // 16, 16)}',
                       'model.attention.alternate_layers': 'every:2'},
      'fixed': {'model.attention.kind': f'fixed:{max(seq_len // 8, 64)}', 'model.attention.fixed.summary': 8},
      'radial': {'model.attention.kind': 'radial:64'},
      'bigbird': {'model.attention.kind': 'bigbird:1'},
  }
  unknown = [n for n in names if n not in arms]
  if unknown:
    raise ValueError(f'unknown arms {unknown}; known: {", ".join(ARM_NAMES)}')
  return tuple((name, arms[name]) for name in names)


# MQAR at 512 tokens, 3000 steps: dense 0.07 -> 0.43 with it, gated 0.02 -> 0.31 (docs/results.md)
SHORT_CONV = 4


def suite_run():
  """The run fields the shipped suites share: a 4-layer, d_model 256 byte-level model (4
  heads, 2 kv heads, 64-token blocks, a 4-tap short convolution before each attention, as
  Zoology's models have one) trained with lr 1e-3 after 100 warm-up steps; the rows are
  made in 4 worker processes (task rows are Python-made: in threads they, not the GPU,
  set the pace)."""
  c = base_config()
  c.data.workers = 4
  c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 256, 4, 4, 2
  c.model.short_conv = SHORT_CONV
  c.model.attention.block_size = 64
  c.train.lr, c.train.warmup_steps, c.train.log_every = 1e-3, 100, 25
  c.checkpoint.every_steps = 500
  return c


def make_quick(c):
  """A suite's run shrunk to a CPU smoke run: a 2-layer d_model 64 model, 3 steps of 2 rows
  made in this process."""
  c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 64, 2, 2, 1
  c.train.steps, c.train.global_batch_size, c.train.warmup_steps, c.train.log_every = 3, 2, 1, 1
  c.checkpoint.every_steps = 3
  c.data.workers = 0
  return c
