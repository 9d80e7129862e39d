"""MQAR (multi-query associative recall, Zoology: Arora et al., 2023) for every mechanism,
trained from scratch on task rows only, on an equal budget.

    python -m sparseformer.cli.compare --config configs/compare/mqar.py --workdir runs/compare/mqar_2k
    python -m sparseformer.cli.compare --config configs/compare/mqar.py:8k --workdir runs/compare/mqar_8k
    python -m sparseformer.cli.compare --config configs/compare/mqar.py:quick --workdir /tmp/compare_quick

Zoology trains 2-layer models on MQAR alone and reports recall against model width,
sequence length and key-value pairs. Here every arm (sparseformer/cli/compare_arms.py:
dense, window, MASFormer, gated, DMA, routing, SSE-H, GLA-H, NSA, MoBA, InfLLM-V2, and the static
patterns power, neighborhood, fixed, radial and BigBird) is a
4-layer, d_model 256 byte-level model (4 heads, 2 kv heads), so that the hybrids have a
dense top layer.
Training rows mix examples with 64, 128 and 256 pairs at the row length with a
curriculum of short, easy ones (32 pairs in 512 tokens, four to a row; at 8k also 64
pairs in 2048), as Zoology trains on a mix of lengths and pair counts: without them a
dense model at 2k stays at chance for 3000 steps (docs/results.md). Each arm is scored on
each long pair count at the training length (answers scored per query, Zoology's
accuracy). Keys and
values are 2-letter codes (vocab 676), so a key is 2 byte tokens, not one token as in
Zoology: the model must match multi-token keys, a harder task than Zoology's at the same
pairs; at 2k tokens 256 pairs do not fit with a query per key, so the queries are
capped (see the task specs below).

Presets: (none) or :2k rows of 2048 tokens (3000 steps x 32 rows); :8k rows of 8192
(3000 x 8); :512 rows of 512 with 32 pairs (1500 x 64); :quick a CPU smoke run
(dense and window arms, a 2-layer d_model 64 model, a few steps at 256 tokens).
Measured at 2k (docs/results.md, MQAR runs 9, 16 and 19, one H100, one seed): dense 0.064 and
SeerAttention gates 0.063 at 64 pairs, DMA 0.035, InfLLM-V2 0.029, MoBA 0.020, power 0.012,
routing 0.011, NSA 0.009, and MASFormer, window, SSE-H and GLA-H at chance (about 0.003). At 8k (run 17) every arm stayed at chance
within this budget: 8k needs more steps, or a start from the 2k arms
(`--from-arms runs/compare/mqar_2k`, docs/compare.md).
"""

import ml_collections

from sparseformer.cli.compare_arms import make_quick, paper_arms, suite_run

LENGTHS = {None: 2048, '2k': 2048, '8k': 8192, '512': 512, 'quick': 256}


CURRICULUM_SHARE = 16  # copies of each curriculum spec among the training specs (specs are drawn uniformly)


def mqar_specs(seq_len):
  """The specs scored at the training length."""
  if seq_len <= 256:
    return ('mqar:pairs=8,vocab=676',)
  if seq_len <= 512:
    return ('mqar:pairs=32,vocab=676',)
  queries = 64 if seq_len <= 2048 else 0  # 0: every key queried once
  return tuple(f'mqar:pairs={pairs},vocab=676,queries={queries}' for pairs in (64, 128, 256))


def training_specs(seq_len):
  """The scored specs plus the curriculum: short examples packed several to a row."""
  if seq_len <= 512:
    return mqar_specs(seq_len)
  curriculum = ['mqar:pairs=32,vocab=676@512']
  if seq_len >= 8192:
    curriculum.append('mqar:pairs=64,vocab=676@2048')
  return tuple(curriculum) * CURRICULUM_SHARE + mqar_specs(seq_len)


def run_config(seq_len, quick):
  c = suite_run()
  c.data.name = 'sparseformer_text/tinyshakespeare'  # only for the end-of-run NLL; training reads task rows
  c.data.seq_len = seq_len
  c.data.tasks = training_specs(seq_len)
  c.data.task_fraction = 1.0
  c.data.task_loss = 'answers'
  c.train.steps = 3000
  c.train.global_batch_size = 32 if seq_len <= 2048 else 8  # 64k tokens a step
  c.train.eval_batches = 2
  c.eval.max_batches = 2
  c.eval.tasks = mqar_specs(seq_len)
  c.eval.task_lengths = (seq_len,)
  c.eval.task_depths = 1
  c.eval.task_samples = 64
  c.eval.task_batch_size = 16
  if seq_len == 512:  # the length at which the 4-layer model learns MQAR within minutes (docs/results.md)
    c.train.steps, c.train.global_batch_size = 1500, 64
  if quick:
    make_quick(c)
    c.eval.task_samples, c.eval.task_batch_size = 2, 2
  return c


def get_config(arg=None):
  if arg not in LENGTHS:
    raise ValueError(f'unknown preset {arg!r}; known: 2k, 8k, 512, quick')
  seq_len, quick = LENGTHS[arg], arg == 'quick'
  suite = ml_collections.ConfigDict()
  suite.run = run_config(seq_len, quick)
  suite.arms = paper_arms(seq_len, names=('dense', 'window') if quick else
                          ('dense', 'window', 'masformer', 'gated', 'dma', 'routing', 'sse_h', 'gla_h', 'nsa', 'moba',
                           'infllm_v2', 'power', 'neighborhood', 'fixed', 'radial', 'bigbird'))
  suite.param_tolerance = 0.03
  suite.match_params = True
  suite.score_nll = False
  suite.notes = ('Arms at their papers\' settings scaled to the row length: sparseformer/cli/compare_arms.py and '
                 'docs/compare.md. MQAR keys are 2-byte codes (Zoology: one token).')
  return suite
