"""Decoding with a cache for routing attention (k/v slots with each key's cluster, a ring
buffer for the local heads) and sparse state expansion (a recurrent state): teacher-forced
decoding gives the forward pass's logits at every position (decode_helpers.py: prompts of
5, 17 and 12 tokens in one batch, 40 tokens, block size 8), over the options that change
which keys a routing query sees and over the sse variants; balanced top-w refuses to
decode; an sse prompt's padding leaves the state as it was after the prompt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_helpers import VOCAB, check_teacher_forcing, model_for

from sparseformer.errors import UserError

# A window of 8 and 3 or 4 clusters: both the local and the routed sparsity show within 40 tokens.
LOCAL = {'local_window': 8}
ROUTING_CASES = {
    'local heads, shared qk': (['routing:4'], {'routing': LOCAL}),
    'local heads, separate qk': (['routing:4'], {'routing': {**LOCAL, 'shared_qk': False}}),
    'routing heads only, shared qk': (['routing:3'], {'routing': {'local_heads': 0}}),
    'routing heads only, separate qk': (['routing:3'], {'routing': {'local_heads': 0, 'shared_qk': False}}),
}
SSE_CASES = {
    'sse: top 2 of 4 and the shared branch': (['sse:4'], {}),
    'gla: sse:1 without the shared branch': (['sse:1'], {'sse': {'shared': False, 'top_k': 1}}),
    'varlen, top 1 of 3, no shared branch, rank 4': (['sse:3'], {'sse': {'shared': False, 'top_k': 1,
                                                                          'mode': 'varlen', 'delta_rank': 4}}),
}
HYBRID = (['routing:4', 'sse:4', 'window:8'], {'routing': LOCAL})


@pytest.mark.parametrize('case', sorted(ROUTING_CASES))
def test_routing_decoding_matches_the_forward_pass(case):
  check_teacher_forcing(*ROUTING_CASES[case])


@pytest.mark.parametrize('case', sorted(SSE_CASES))
def test_sse_decoding_matches_the_forward_pass(case):
  check_teacher_forcing(*SSE_CASES[case])


def test_a_stack_of_routing_sse_and_window_layers_decodes():
  check_teacher_forcing(*HYBRID)


@pytest.mark.slow  # a check of the cases above (1-13 s each)
@pytest.mark.parametrize('case', sorted(ROUTING_CASES))
def test_the_routing_cases_split_the_keys_into_clusters(case):
  """Each routing head's 40 keys fall in at least 2 clusters, none holding 3/4 of them: the
  cluster mask is far from causal dense (what the teacher-forced tests rely on)."""
  specs, attention = ROUTING_CASES[case]
  model = model_for(specs, attention)
  tokens = jax.random.randint(jax.random.key(1), (3, 40), 3, VOCAB)
  _, cache = model.prefill(tokens, jnp.full((3,), 40, jnp.int32), model.init_cache(3, 40))
  clusters = np.asarray(cache[0]['routed']['cluster'])  # [B, S, Hr]
  share = np.stack([(clusters == c).mean(1) for c in range(int(specs[0].split(':')[1]))])
  assert share.max() < 0.75, share.max()


def test_balanced_top_w_refuses_to_decode():
  model = model_for(['routing:4'], {'routing': {'selection': 'balanced_topw'}})
  with pytest.raises(UserError, match='selection=causal'):
    model.init_cache(2, 40)


@pytest.mark.slow  # 5-15 s a case; the teacher-forcing tests decode ragged (padded) SSE prompts by default
@pytest.mark.parametrize('shared', [True, False])
def test_sse_prompt_padding_leaves_the_state_unchanged(shared):
  """Prefill of right-padded prompts ends with each row's state after its own last token:
  that of the prompt alone, bit for bit close."""
  mechanism = model_for(['sse:4'], {'sse': {'shared': shared}}).blocks[0].attention.mechanism
  heads, kv_heads, d, b, t = 4, 2, 16, 2, 24
  keys = jax.random.split(jax.random.key(3), 4)
  inputs = (jax.random.normal(keys[0], (b, t, heads, d)), jax.random.normal(keys[1], (b, t, kv_heads, d)),
            jax.random.normal(keys[2], (b, t, kv_heads, d)), jax.random.normal(keys[3], (b, t, heads * d)))
  lengths = (7, 19)
  segment_ids = (jnp.arange(t)[None] < jnp.asarray(lengths)[:, None]).astype(jnp.int32)
  _, state = mechanism.prefill_state(*inputs, segment_ids)
  for row, length in enumerate(lengths):
    _, alone = mechanism.prefill_state(*(a[row:row + 1, :length] for a in inputs))
    for name in alone:
      np.testing.assert_allclose(state[name][row], alone[name][0], rtol=1e-5, atol=1e-6, err_msg=name)
