"""The chunked loss (training/loss.py) gives the one-shot loss's per-token NLL and gradients,
in training and evaluation, on one device and on meshes of 8 fake devices, and compiles to
less memory for a long sequence over a large vocabulary.

Tolerances (float32): NLL within 1e-6 relative; each gradient array within 1e-5 of its
largest magnitude (the chunks change the order in which the unembedding gradient is summed;
observed: at most 2e-7 of it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer import sharding
from sparseformer.config import base_config, validate
from sparseformer.errors import UserError
from sparseformer.evaluation.evaluate import make_eval_batch_fn
from sparseformer.model import resolve_dims
from sparseformer.training.assembly import assemble_train_step
from sparseformer.training.loss import DEFAULT_LOSS_CHUNK
from sparseformer.training.state import model_arrays, model_spec
from sparseformer.training.step import forward

from mesh_helpers import results_on_8_cpu_devices

VOCAB, LENGTH = 259, 32


def tiny_spec(tie_embeddings=True, vocab=VOCAB, d_model=32, attention='dense'):
  cfg = base_config()
  m = cfg.model
  m.d_model, m.num_layers, m.num_heads, m.dtype = d_model, 1, 2, 'float32'
  m.tie_embeddings, m.attention.kind = tie_embeddings, attention
  return cfg, model_spec(resolve_dims(m, vocab), sharding.make_mesh(cfg.mesh), cfg.mesh.rules)


def random_batch(rows=2, length=LENGTH, vocab=VOCAB):
  rng = np.random.default_rng(0)
  mask = np.ones((rows, length), np.float32)
  mask[-1, length // 2:] = 0
  return {'tokens': rng.integers(0, vocab, (rows, length)).astype(np.int32),
          'targets': rng.integers(0, vocab, (rows, length)).astype(np.int32),
          'positions': np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
          'segment_ids': np.ones((rows, length), np.int32), 'loss_mask': mask}


def nll_and_grads(spec, state, batch, loss_chunk):

  @jax.jit
  def run(params):
    def total(params):
      nll, _, _, _ = forward(spec.graphdef, params, state['mechanism_state'], batch, training=True,
                             loss_chunk=loss_chunk)
      return nll.sum(), nll
    return jax.grad(total, has_aux=True)(params)

  grads, nll = run(state['params'])
  return nll, grads


def assert_close_to_scale(actual, expected, rtol=1e-5):
  scale = float(np.abs(expected).max())
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def fresh_state(spec):
  return jax.jit(lambda: model_arrays(spec.dims, jax.random.key(0)))()


@pytest.mark.parametrize('tie_embeddings', [True, False], ids=['tied', 'untied'])
def test_chunked_nll_and_gradients_equal_the_one_shot_loss(tie_embeddings):
  cfg, spec = tiny_spec(tie_embeddings)
  state, batch = fresh_state(spec), random_batch()
  nll, grads = nll_and_grads(spec, state, batch, loss_chunk=0)
  assert ('unembedding' in grads) != tie_embeddings
  for chunk in (8, 12):  # 4 chunks; 3 chunks with the last one padded by 4 positions
    chunked_nll, chunked_grads = nll_and_grads(spec, state, batch, loss_chunk=chunk)
    np.testing.assert_allclose(chunked_nll, nll, rtol=1e-6)
    jax.tree.map(assert_close_to_scale, chunked_grads, grads)
  assert float(jnp.abs(nll[1, LENGTH // 2:]).max()) == 0.0  # the loss mask still applies


def test_evaluation_sums_are_those_of_the_one_shot_loss():
  cfg, spec = tiny_spec()
  state, batch = fresh_state(spec), random_batch()
  token_bytes = jnp.ones(VOCAB, jnp.float32)
  sums = [make_eval_batch_fn(spec.graphdef, LENGTH, loss_chunk=chunk)(
      state['params'], state['mechanism_state'], batch, token_bytes) for chunk in (0, 12)]
  assert float(sums[0]['nll_sum']) > 0
  for name in sums[0]:
    np.testing.assert_allclose(sums[1][name], sums[0][name], rtol=1e-6, err_msg=name)


def test_a_long_sequence_over_a_large_vocabulary_compiles_to_far_less_memory():
  """Logits of 1 x 4096 x 16384 float32 are 256 MiB; chunks of 512 positions hold 32 MiB."""
  cfg, spec = tiny_spec(vocab=16384, d_model=64, attention='window:128')
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), random_batch(1, 4096, 16384))
  temp_bytes = {}
  for chunk in (0, 512):
    cfg.train.loss_chunk = chunk
    parts = assemble_train_step(cfg, spec)
    state = jax.eval_shape(lambda: parts.fresh_state(seed=0))
    temp_bytes[chunk] = parts.step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
  assert temp_bytes[0] > 256 * 2**20, temp_bytes
  assert temp_bytes[512] < 0.5 * temp_bytes[0], temp_bytes


def test_loss_chunk_default_and_validation():
  cfg = base_config()
  assert cfg.train.loss_chunk == DEFAULT_LOSS_CHUNK
  cfg.train.loss_chunk = -1
  with pytest.raises(UserError, match='train.loss_chunk'):
    validate(cfg)


MESH_SCRIPT = r'''
import json, sys
import jax, numpy as np
from sparseformer import sharding
from sparseformer.training.assembly import assemble_train_step
from tests.mesh_helpers import tiny_window_model

ROWS, LENGTH = 8, 256
rng = np.random.default_rng(0)
tokens = rng.integers(1, 256, (ROWS, LENGTH + 1)).astype(np.int32)
batch = {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': np.ones((ROWS, LENGTH), np.float32),
         'positions': np.tile(np.arange(LENGTH, dtype=np.int32), (ROWS, 1)),
         'segment_ids': np.ones((ROWS, LENGTH), np.int32)}


def one_step(axes, loss_chunk):
  cfg, mesh, rules, spec = tiny_window_model(axes, 256)
  cfg.train.loss_chunk = loss_chunk
  parts = assemble_train_step(cfg, spec, sharding.batch_sharding(mesh, rules))
  placed = {k: jax.device_put(v, parts.batch_sharding) for k, v in batch.items()}
  _, metrics = parts.step(parts.fresh_state(cfg.seed), placed)
  return [float(metrics['loss']), float(metrics['grad_norm'])]


print('RESULTS ' + json.dumps([one_step(axes, chunk) for axes, chunk in json.loads(sys.argv[1])]))
'''


def sharded_results(cases):
  """[loss, grad norm] of one step per (mesh axes, loss_chunk) case, in one subprocess that
  sees 8 CPU devices; the first case is the single-device one-shot loss."""
  cases = [({'data': 1}, 0)] + cases
  (loss, grad_norm), *sharded = results_on_8_cpu_devices(MESH_SCRIPT, cases)
  for (case, _), (sharded_loss, sharded_grad_norm) in zip(cases[1:], sharded):
    assert abs(sharded_loss - loss) <= 1e-5 * loss, (case, sharded_loss, loss)
    assert abs(sharded_grad_norm - grad_norm) <= 1e-4 * grad_norm, (case, sharded_grad_norm, grad_norm)


def test_chunked_loss_on_a_data_sequence_tensor_mesh_matches_one_device():
  """Chunks of 96 of 256 positions (the last one padded) on data 2 x sequence 2 x tensor 2:
  each sequence shard holds 48 positions of every chunk, the vocabulary is split over tensor."""
  sharded_results([({'data': 2, 'sequence': 2, 'tensor': 2}, 96)])


@pytest.mark.slow
def test_chunked_loss_on_sequence_and_fsdp_meshes_matches_one_device():
  sharded_results([({'sequence': 4}, 64), ({'fsdp': 8}, 100), ({'fsdp': 2, 'sequence': 4}, 128)])
