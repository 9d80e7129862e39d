"""Parity with transformers itself: tests/fixtures/hf/<family>/ holds a tiny random model
saved by transformers' save_pretrained, a tokenizer, fixed token ids and transformers'
float32 logits for them (made by tests/fixtures/hf/make_fixtures.py on a machine with
torch and transformers). Each is imported here and its logits compared.

Tolerance: both sides compute in float32 with different operation orders; the logits
(|max| about 1-3 for these models) must agree to 1e-5 of their largest magnitude (measured: 3e-7)."""

import os

import numpy as np
import pytest

from sparseformer.interop.hf_import import import_model
from test_hf_import import imported_model, logits_of

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'hf')
FAMILIES = ('llama', 'mistral', 'qwen2', 'qwen3')


@pytest.mark.parametrize('family', FAMILIES)
def test_imported_logits_match_transformers(tmp_path, family):
  source = os.path.join(FIXTURES, family)
  import_model(source, str(tmp_path / 'run'), {'model.dtype': 'float32'}, log=lambda *a: None)
  model, _ = imported_model(tmp_path / 'run')
  tokens = np.load(os.path.join(source, 'token_ids.npy'))
  want = np.load(os.path.join(source, 'logits.npy')).astype(np.float64)
  got = logits_of(model, tokens)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  assert np.argmax(got, -1).tolist() == np.argmax(want, -1).tolist()
