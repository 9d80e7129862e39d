"""Generation (sparseformer/generation): greedy decoding through the caches picks the
tokens that recomputing the whole forward pass each step picks; seeded sampling repeats;
stop tokens end a row; top-k and top-p keep the tokens they should."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_helpers import VOCAB, jitted, model_for
from flax import nnx

from sparseformer.errors import UserError
from sparseformer.generation import Generator, Sampling
from sparseformer.generation.sampling import keep_top_k, keep_top_p, next_tokens
from sparseformer.training.state import split_model

PROMPTS = [[5, 9, 200, 31, 7], list(range(40, 57)), [3]]


def generator_for(specs):
  model = model_for(specs)
  graphdef, params, mechanism_state = split_model(model)
  arrays = {'params': params.to_pure_dict(), 'mechanism_state': mechanism_state.to_pure_dict()}
  return model, Generator(graphdef, arrays, vocab_size=VOCAB)


def recomputed_greedy(model, prompt, count):
  """Greedy continuation by running the whole forward pass again for every token (rows
  padded to 32 tokens at the end: no earlier token sees the padding)."""
  forward = jitted(model, '__call__')
  tokens = list(prompt)
  for _ in range(count):
    padded = jnp.asarray([tokens + [0] * (32 - len(tokens))])
    logits, _ = forward(padded, jnp.arange(32)[None], None)
    tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1, :VOCAB])))
  return tokens[len(prompt):]


@pytest.mark.parametrize('specs', [['dense'], ['dense', 'window:8']], ids=['dense', 'masformer'])
def test_greedy_generation_matches_recomputing_the_forward_pass(specs):
  model, generator = generator_for(specs)
  result = generator.generate(PROMPTS, max_new_tokens=12)
  for prompt, tokens in zip(PROMPTS, result.tokens):
    assert tokens == recomputed_greedy(model, prompt, 12)
  assert result.finish_reasons == ['length'] * 3
  assert result.decode_steps == 11


def test_seeded_sampling_repeats_and_seeds_differ():
  _, generator = generator_for(['dense'])
  sampling = Sampling(temperature=1.0, top_k=50, top_p=0.95)
  run = lambda seed: generator.generate(PROMPTS, max_new_tokens=16, sampling=sampling, seed=seed).tokens  # noqa: E731
  first = run(3)
  assert run(3) == first
  assert run(4) != first


def test_a_stop_token_ends_its_row_only():
  _, generator = generator_for(['dense'])
  free = generator.generate(PROMPTS, max_new_tokens=10).tokens
  stop = free[0][3]
  assert stop not in free[1]
  result = generator.generate(PROMPTS, max_new_tokens=10, stop_tokens=[stop])
  assert result.tokens[0] == free[0][:free[0].index(stop) + 1]
  assert result.finish_reasons[0] == 'stop'
  assert result.tokens[1] == free[1] and result.finish_reasons[1] == 'length'


def test_top_k_and_top_p_keep_the_largest_tokens():
  logits = jnp.log(jnp.asarray([[0.1, 0.5, 0.2, 0.15, 0.05]]))
  assert np.isfinite(np.asarray(keep_top_k(logits, 2))).tolist() == [[False, True, True, False, False]]
  # 0.5 first, 0.2 brings it to 0.7 >= 0.6; the rest are outside the nucleus.
  assert np.isfinite(np.asarray(keep_top_p(logits, 0.6))).tolist() == [[False, True, True, False, False]]
  assert np.isfinite(np.asarray(keep_top_p(logits, 0.3))).tolist() == [[False, True, False, False, False]]
  key = jax.random.key(0)
  samples = [int(next_tokens(logits, jax.random.fold_in(key, i), Sampling(1.0, top_k=2), 5)[0]) for i in range(64)]
  assert set(samples) == {1, 2}


def test_padded_vocabulary_ids_are_never_chosen():
  logits = jnp.asarray([[0.0, 1.0, 9.0]])
  assert int(next_tokens(logits, jax.random.key(0), Sampling(), vocab_size=2)[0]) == 1


@pytest.mark.parametrize('request_, message', [
    (dict(prompts=[], max_new_tokens=4), 'no prompt'),
    (dict(prompts=[[5], []], max_new_tokens=4), 'prompt 1 is empty'),
    (dict(prompts=[[5]], max_new_tokens=0), 'max_new_tokens=0'),
    (dict(prompts=[[5]], max_new_tokens=4, sampling=Sampling(top_p=0.0)), 'top_p=0.0'),
    (dict(prompts=[[5]], max_new_tokens=4, sampling=Sampling(temperature=-1.0)), 'temperature=-1.0'),
])
def test_requests_that_cannot_run_say_why(request_, message):
  _, generator = generator_for(['dense'])
  with pytest.raises(UserError, match=message):
    generator.generate(**request_)


def test_a_model_with_a_layer_that_cannot_decode_is_refused(monkeypatch):
  from sparseformer.model.attention.local import SlidingWindowAttention
  monkeypatch.setattr(SlidingWindowAttention, 'can_decode', classmethod(lambda cls: False))
  with pytest.raises(UserError, match=r'layer 1 \(window:8\): the window mechanism has no decoding yet'):
    generator_for(['dense', 'window:8'])


MESH_SCRIPT = r'''
import json, sys
import jax
sys.path.insert(0, 'tests')
from mesh_helpers import tiny_window_model
from sparseformer.generation import Generator
from sparseformer.training.state import model_arrays, model_shardings
prompts = [[5, 9, 200, 31, 7], list(range(40, 57)), [3], [7] * 30, [11, 12]]
results = {}
for name, (axes, layers) in json.loads(sys.argv[1]).items():
  cfg, mesh, rules, spec = tiny_window_model(axes, 259, num_layers=2, layer_attention=tuple(layers))
  arrays = jax.device_put(model_arrays(spec.dims, jax.random.key(0)), model_shardings(spec))
  placed = dict(mesh=mesh, rules=rules) if not name.startswith('no_mesh') else {}
  generator = Generator(spec.graphdef, arrays, vocab_size=259, **placed)
  results[name] = generator.generate(prompts, max_new_tokens=6).tokens
print('RESULTS ' + json.dumps(results))
'''


def test_generation_on_a_mesh_matches_one_device():
  """Rows split over data (5 prompts padded to the shards), heads over tensor, the
  sequence over sequence shards: the same greedy tokens as without a mesh; a routing
  layer's cache (keys of its routing heads) too."""
  from mesh_helpers import results_on_8_cpu_devices
  mixed, routed = ['dense', 'window:80'], ['routing:2', 'window:80']
  cases = {'no_mesh': ({'data': 1}, mixed), 'data4': ({'data': 4}, mixed), 'data2_tensor2': ({'data': 2, 'tensor': 2}, mixed),
           'fsdp2_sequence2': ({'fsdp': 2, 'sequence': 2}, mixed), 'no_mesh_routing': ({'data': 1}, routed),
           'routing_data2_tensor2': ({'data': 2, 'tensor': 2}, routed)}
  results = results_on_8_cpu_devices(MESH_SCRIPT, cases)
  for name in cases:
    assert results[name] == results['no_mesh_routing' if 'routing' in name else 'no_mesh'], name


def test_the_device_loop_makes_the_tokens_generate_makes():
  _, generator = generator_for(['dense', 'window:8'])
  prompts = [p[:5] for p in PROMPTS[:2]] + [[3, 4, 5, 6, 7]]  # equal lengths: one position per step for all rows
  want = generator.generate(prompts, max_new_tokens=7).tokens
  batch, prompt_len, max_len = generator.shapes(prompts, 7)
  assert (batch, prompt_len, max_len) == (3, 8, 16)
  (prefill, _), _ = generator.compiled(batch, prompt_len, max_len, Sampling())
  padded = np.zeros((3, prompt_len), np.int32)
  padded[:, :5] = prompts
  lengths = np.full(3, 5, np.int32)
  tokens, cache = prefill(generator.arrays, padded, lengths, jax.random.key(0))
  tokens, _ = generator.device_loop(6)(generator.arrays, cache, tokens, lengths, jax.random.key(1))
  assert np.asarray(tokens).tolist() == [row[-1] for row in want]
