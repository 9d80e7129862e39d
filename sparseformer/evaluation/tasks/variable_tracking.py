"""RULER's variable tracking (vt) in book filler: chains of assignments

  VAR QPWKX = 52013. ... VAR LMDZA = VAR QPWKX. ... VAR TRBNE = VAR LMDZA. ...

with `hops` variable-to-variable assignments after the first (hops + 1 variables per
chain, as RULER's num_hops), `chains` chains with distinct values. The statements of a
chain appear in order: the first chain's first statement at the requested depth, its
others at sorted random depths after it; other chains start at random depths. The
question asks for every variable holding the first chain's value; the answers are that
chain's variable names in chain order, one answer piece each, separated by ' '.
"""

import string

from sparseformer.errors import UserError
from sparseformer.evaluation.tasks import haystack
from sparseformer.evaluation.tasks.base import Piece, register


def variable_name(rng):
  return ''.join(string.ascii_uppercase[i] for i in rng.integers(26, size=5))


@register('variable_tracking')
def variable_tracking(rng, tokenizer, length, depth, split, hops=4, chains=1):
  if not 1 <= hops <= 100:
    raise UserError(f'variable_tracking: hops={hops}: use 1 to 100')
  if not 1 <= chains <= 20:
    raise UserError(f'variable_tracking: chains={chains}: use 1 to 20')
  names, values = [], []
  while len(names) < chains * (hops + 1):
    name = variable_name(rng)
    if name not in names:
      names.append(name)
  while len(values) < chains:
    value = str(int(rng.integers(10_000, 100_000)))
    if value not in values:
      values.append(value)
  needles, depths = [], []
  for c in range(chains):
    chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
    start = depth if c == 0 else float(rng.uniform())
    later = sorted(float(d) for d in rng.uniform(start, 1.0, size=hops))
    statements = [f'VAR {chain[0]} = {values[c]}. '] + [f'VAR {b} = VAR {a}. ' for a, b in zip(chain, chain[1:])]
    needles += [[Piece(s, 'needle')] for s in statements]
    depths += [start] + later
  asked = names[:hops + 1]
  turns = [Piece(f'\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. '
                 f'Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} '
                 f'variables are assigned the value {values[0]}, they are: ', 'question')]
  for i, name in enumerate(asked):
    if i:
      turns.append(Piece(' ', 'question'))
    turns.append(Piece(name, 'answer'))
  return haystack.haystack_example('variable_tracking', rng, tokenizer, length, split, needles, depths, turns,
                                   what='the assignments, question and answers')
