"""Converting a dense model: one dense base run, then every arm continues from its
parameters on the same data for the same steps, and all are scored on retrieval and books.

    python -m sparseformer.cli.compare --config configs/compare/convert.py --workdir runs/compare/convert
    python -m sparseformer.cli.compare --config configs/compare/convert.py:quick --workdir /tmp/convert_quick

This is how InfLLM-V2 (arXiv 2509.24663) and MoBA (arXiv 2502.13189) are trained: a dense
base, then sparse training with the same projections (neither adds parameters), and how a
researcher tries any mechanism on a pretrained model (docs/hf_interop.md). The base is the
retrieval suite's dense arm (`configs/compare/retrieval.py`: 4 layers, d_model 256, 8192-token
rows, three quarters of them task rows among the books, 1200 steps; it finds the passkey at
0.95 at 8192 tokens, docs/results.md MQAR run 15); each arm then trains 300 steps
more on the same mix, at a lower learning rate. Mechanisms with parameters of their own
(NSA's compression and gates, SeerAttention's gates) start them fresh; the shared ones
start as the base's. The `dense` arm is the baseline: the base trained 300 steps more.
Scores: validation NLL by position and passkey / NIAH / variable tracking / common words at
4k to 32k, as in the retrieval suite; the base is scored too (row `base`).

Presets: (none) the run above; :quick a CPU smoke run (a 2-layer d_model 64 base of 3
steps at 256 tokens, then dense and MoBA 2 steps each).
Measured (docs/results.md run 20, one H100, one seed, arms dense/infllm_v2/nsa/moba): passkey at
4k / 8k: base 1.00 / 1.00; after 300 steps dense 1.00 / 1.00, InfLLM-V2 1.00 / 0.90, NSA
0.85 / 0.95, MoBA 1.00 / 0.35; book NLL 2.04-2.07 nats/byte for all four.
"""

import os

import ml_collections

from sparseformer.cli.compare_arms import paper_arms
from sparseformer.config import call_get_config

RETRIEVAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'retrieval.py')
CONTINUED_STEPS = 300
CONTINUED_LR = 3e-4


def get_config(arg=None):
  if arg not in (None, 'quick'):
    raise ValueError(f'unknown preset {arg!r}; known: quick')
  quick = arg == 'quick'
  retrieval = call_get_config(RETRIEVAL + (':quick' if quick else ''), 'suite')
  suite = ml_collections.ConfigDict()
  suite.base = retrieval.run
  suite.run = ml_collections.ConfigDict(retrieval.run.to_dict())
  suite.run.train.steps = 2 if quick else CONTINUED_STEPS
  suite.run.train.lr = CONTINUED_LR
  suite.run.train.warmup_steps = 1 if quick else 30
  seq_len = suite.run.data.seq_len
  names = ('dense', 'moba') if quick else ('dense', 'infllm_v2', 'moba', 'nsa', 'gated', 'masformer', 'window')
  suite.arms = paper_arms(seq_len, names=names)
  suite.param_tolerance = 0.5  # NSA's compression and the gates add parameters; nothing is resized
  suite.match_params = False
  suite.score_nll = True
  suite.notes = ('Every arm continues the dense base run at its papers\' settings scaled to the row length '
                 '(sparseformer/cli/compare_arms.py, docs/compare.md).')
  return suite
