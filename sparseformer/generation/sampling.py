"""Choosing the next token from the logits: greedy, or sampled at a temperature from the
top-k and/or top-p (nucleus) tokens. One key per step, so a seed fixes the output."""

import dataclasses

import jax
import jax.numpy as jnp

from sparseformer.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0: greedy (the largest logit, ties to the lower id); otherwise sampled
  from softmax(logits / temperature) restricted to the `top_k` largest (0: all) and to
  the smallest set of largest whose probability reaches `top_p` (1: all)."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def problem(self):
    """The message for settings that cannot work, or None."""
    if not self.temperature >= 0:
      return f'temperature={self.temperature}: use 0 (greedy) or more'
    if self.top_k < 0:
      return f'top_k={self.top_k}: use 0 (all tokens) or a positive count'
    if not 0 < self.top_p <= 1:
      return f'top_p={self.top_p}: use a probability in (0, 1]'
    return None

  def check(self):
    problem = self.problem()
    if problem:
      raise UserError(problem)
    return self

  @property
  def greedy(self):
    return self.temperature == 0


def next_tokens(logits, key, sampling, vocab_size):
  """int32 [B]: the next token of each row from float32 logits [B, V >= vocab_size] (ids
  at or past vocab_size, the embedding's padding, are never chosen)."""
  logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits.astype(jnp.float32), -jnp.inf)
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k:
    logits = keep_top_k(logits, min(sampling.top_k, vocab_size))
  if sampling.top_p < 1:
    logits = keep_top_p(logits, sampling.top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def keep_top_k(logits, k):
  """logits with all but each row's k largest set to -inf (ties at the k-th all kept)."""
  kth = jax.lax.top_k(logits, k)[0][:, -1:]
  return jnp.where(logits >= kth, logits, -jnp.inf)


def keep_top_p(logits, p):
  """logits with -inf outside each row's nucleus: the largest tokens whose probabilities,
  added in decreasing order, first reach p (the largest token always kept)."""
  order = jnp.argsort(-logits, axis=-1)
  sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
  before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # probability of the larger tokens
  keep_sorted = before < p
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)
