"""python -m sparseformer.cli.generate --workdir DIR (--prompt TEXT | --prompt_file FILE)
    [--step K] [--max_new_tokens 200] [--temperature 0] [--top_k 0] [--top_p 1] [--seed 0]
    [--stop TEXT] [--stop_tokens ID,ID] [--out FILE.jsonl] [--config.FIELD=VALUE ...]

Generates text from a checkpoint of a run (the newest unless --step is set), or of an
imported Hugging Face model (its workdir, from sparseformer.cli.import_hf). Each prompt
is encoded as training documents start (the tokenizer's bos first, where it has one),
prefilled through the training kernels, then continued one token at a time through each
layer's cache (docs/generation.md).

  --prompt TEXT         one prompt
  --prompt_file FILE    one prompt per line; a .jsonl file: one JSON string, or an object
                        with a "prompt" field, per line (for prompts with line breaks)
  --max_new_tokens N    tokens to add to each prompt at most (default 200)
  --temperature T       0 (default): greedy; > 0: sampled, with --top_k K (0: all tokens)
                        and --top_p P (1: all), from --seed S
  --stop TEXT           also stop a row once its new text contains TEXT (cut there);
                        every row stops at the tokenizer's end-of-document token
  --stop_tokens IDS     more token ids to stop at, comma-separated
  --out FILE.jsonl      write {"prompt", "completion", "tokens", "finish_reason"} per prompt

One prompt streams its text as it is produced; several are printed as they finish
together (one batch, prompts of any lengths). Compile, prefill and decode times and the
decode tokens/s are printed at the end.
"""

import json
import os
import sys

from sparseformer.cli.eval import restore_checkpoint, start_devices, workdir_config_and_flags
from sparseformer.cli.main import run_command
from sparseformer.errors import UserError
from sparseformer.generation import Generator, Sampling
from sparseformer.training.setup import prepare_run

FLAGS = ('prompt', 'prompt_file', 'step', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'seed', 'stop',
         'stop_tokens', 'out')


def number(flags, name, kind, default):
  """The flag's value as `kind` (int or float), or `default`; UserError if it is not one."""
  if name not in flags:
    return default
  try:
    return kind(flags[name])
  except ValueError:
    raise UserError(f'--{name}={flags[name]!r}: use {"an integer" if kind is int else "a number"}') from None


def read_prompts(flags):
  """The prompts of --prompt or --prompt_file, as texts."""
  if ('prompt' in flags) == ('prompt_file' in flags):
    raise UserError('generate needs one of --prompt TEXT or --prompt_file FILE (see --help)')
  if 'prompt' in flags:
    return [flags['prompt']]
  path = flags['prompt_file']
  if not os.path.isfile(path):
    raise UserError(f'--prompt_file={path}: no such file')
  with open(path, encoding='utf-8') as f:
    lines = [line.rstrip('\n') for line in f]
  prompts = [jsonl_prompt(line, path, i + 1) if path.endswith('.jsonl') else line
             for i, line in enumerate(lines) if line.strip()]
  if not prompts:
    raise UserError(f'--prompt_file={path} holds no prompt')
  return prompts


def jsonl_prompt(line, path, line_number):
  try:
    value = json.loads(line)
  except json.JSONDecodeError as e:
    raise UserError(f'{path}:{line_number}: not JSON ({e.msg})') from None
  if isinstance(value, dict):
    value = value.get('prompt')
  if not isinstance(value, str):
    raise UserError(f'{path}:{line_number}: give a JSON string or an object with a "prompt" string')
  return value


def encode_prompt(tokenizer, text):
  lead = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  return lead + [int(t) for t in tokenizer.encode(text)]


def stop_token_ids(flags, tokenizer):
  ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  for item in flags.get('stop_tokens', '').split(','):
    if item.strip():
      try:
        ids.append(int(item))
      except ValueError:
        raise UserError(f'--stop_tokens={flags["stop_tokens"]!r}: use comma-separated token ids') from None
  return ids


def completion_text(tokenizer, tokens, stop):
  """The new text of a row, cut before the stop text if it holds one."""
  text = tokenizer.decode(tokens)
  return text.split(stop, 1)[0] if stop else text


class Streamer:
  """Prints row 0's new text as its tokens arrive (holding back an unfinished UTF-8
  character, which decodes to U+FFFD until its last byte comes)."""

  def __init__(self, tokenizer, stop):
    self.tokenizer, self.stop = tokenizer, stop
    self.tokens, self.printed = [], ''

  def __call__(self, step, tokens, live):
    if not live[0]:
      return
    self.tokens.append(int(tokens[0]))
    full = self.tokenizer.decode(self.tokens)
    text = full.split(self.stop, 1)[0] if self.stop and self.stop in full else full.rstrip('\ufffd')
    if text.startswith(self.printed):
      print(text[len(self.printed):], end='', flush=True)
      self.printed = text


def generate_command(argv):
  loaded = workdir_config_and_flags(argv, __doc__, 'generate', extra=FLAGS)
  if loaded is None:
    return 0
  workdir, cfg, flags = loaded
  sampling = Sampling(number(flags, 'temperature', float, 0.0), number(flags, 'top_k', int, 0),
                      number(flags, 'top_p', float, 1.0)).check()
  max_new_tokens = number(flags, 'max_new_tokens', int, 200)
  cfg.eval.step = number(flags, 'step', int, cfg.eval.step)
  texts = read_prompts(flags)
  start_devices()
  setup = prepare_run(cfg, needs_data=False)
  tokenizer, stop = setup.tokenizer, flags.get('stop', '')
  prompts = [encode_prompt(tokenizer, text) for text in texts]
  step, model_arrays = restore_checkpoint(workdir, cfg, setup, log=lambda m: print(m, file=sys.stderr))
  print(f'generating from step {step} of {workdir}', file=sys.stderr)
  generator = Generator(setup.spec.graphdef, model_arrays, vocab_size=tokenizer.vocab_size, mesh=setup.mesh,
                        rules=tuple(cfg.mesh.rules))
  streamer = Streamer(tokenizer, stop) if len(prompts) == 1 else None
  if streamer:
    print(texts[0], end='', flush=True)
  result = generator.generate(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                              seed=number(flags, 'seed', int, 0), stop_tokens=stop_token_ids(flags, tokenizer),
                              stop_texts=(stop,) if stop else (), detokenize=tokenizer.decode, on_step=streamer)
  completions = [completion_text(tokenizer, tokens, stop) for tokens in result.tokens]
  if streamer:
    print(flush=True)
  else:
    for i, (text, completion) in enumerate(zip(texts, completions)):
      print(f'--- prompt {i} ({result.finish_reasons[i]}) ---\n{text}{completion}')
  if 'out' in flags:
    write_completions(flags['out'], texts, completions, result)
  print(result.summary(), file=sys.stderr)
  return 0


def write_completions(path, texts, completions, result):
  with open(path, 'w', encoding='utf-8') as f:
    for text, completion, tokens, reason in zip(texts, completions, result.tokens, result.finish_reasons):
      f.write(json.dumps({'prompt': text, 'completion': completion, 'tokens': tokens, 'finish_reason': reason}) + '\n')


def main(argv=None):
  sys.exit(run_command(generate_command, argv))


if __name__ == '__main__':
  main()
