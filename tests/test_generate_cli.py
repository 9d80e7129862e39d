"""python -m sparseformer.cli.generate on the model scripts/main.sh trains (configs/default.py,
tiny): seeded output repeats, rows stop at stop texts and stop tokens, a batch of prompts
of different lengths, and bad input is one line."""

import json

import pytest
from train_helpers import trained_workdir

from sparseformer.cli.generate import generate_command
from sparseformer.cli.main import run_command


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, data_dir):
  return trained_workdir(tmp_path_factory, data_dir)


def generate(workdir, tmp_path, name, *flags):
  """The rows written to --out, and the command's exit code."""
  out = tmp_path / f'{name}.jsonl'
  code = run_command(generate_command, ['--workdir', str(workdir), '--out', str(out), *flags])
  rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
  return rows, code


def test_sampling_with_a_seed_repeats_and_streams(workdir, tmp_path, capsys):
  flags = ['--prompt', 'ROMEO:', '--max_new_tokens', '24', '--temperature', '0.9', '--top_k', '40', '--seed', '7']
  first, code = generate(workdir, tmp_path, 'first', *flags)
  assert code == 0
  streamed = capsys.readouterr()
  again, _ = generate(workdir, tmp_path, 'again', *flags)
  assert again == first
  assert len(first) == 1 and len(first[0]['tokens']) == 24 and first[0]['finish_reason'] == 'length'
  assert streamed.out == 'ROMEO:' + first[0]['completion'] + '\n'
  assert 'tokens/s' in streamed.err


def test_rows_stop_at_a_stop_text_or_token(workdir, tmp_path):
  free, _ = generate(workdir, tmp_path, 'free', '--prompt', 'First Citizen:', '--max_new_tokens', '16')
  tokens, text = free[0]['tokens'], free[0]['completion']
  stop_text = text[5]
  cut, _ = generate(workdir, tmp_path, 'cut', '--prompt', 'First Citizen:', '--max_new_tokens', '16',
                    '--stop', stop_text)
  assert cut[0]['completion'] == text[:text.index(stop_text)]
  assert cut[0]['finish_reason'] == 'stop'
  stopped, _ = generate(workdir, tmp_path, 'stopped', '--prompt', 'First Citizen:', '--max_new_tokens', '16',
                        '--stop_tokens', str(tokens[3]))
  assert stopped[0]['tokens'] == tokens[:tokens.index(tokens[3]) + 1]


def test_a_batch_of_prompts_of_different_lengths(workdir, tmp_path):
  prompts = tmp_path / 'prompts.jsonl'
  texts = ['A', 'KING HENRY:\nWhat say you?', {'prompt': 'Nay,\nmy lord'}]
  prompts.write_text('\n'.join(json.dumps(t) for t in texts) + '\n')
  batch, code = generate(workdir, tmp_path, 'batch', '--prompt_file', str(prompts), '--max_new_tokens', '8')
  assert code == 0 and [row['prompt'] for row in batch] == ['A', 'KING HENRY:\nWhat say you?', 'Nay,\nmy lord']
  alone, _ = generate(workdir, tmp_path, 'alone', '--prompt', 'KING HENRY:\nWhat say you?', '--max_new_tokens', '8')
  assert batch[1]['tokens'] == alone[0]['tokens']  # greedy: the batch changes nothing


@pytest.mark.parametrize('flags, message', [
    ([], 'needs one of --prompt TEXT or --prompt_file FILE'),
    (['--prompt', 'a', '--top_p', '1.5'], 'top_p=1.5'),
    (['--prompt', 'a', '--max_new_tokens', 'many'], "--max_new_tokens='many': use an integer"),
    (['--prompt', 'a', '--step', '3'], 'no checkpoint for step 3'),
    (['--prompt_file', 'missing.txt'], 'no such file'),
])
def test_bad_input_is_one_line(workdir, tmp_path, capsys, flags, message):
  _, code = generate(workdir, tmp_path, 'bad', *flags)
  assert code == 2
  assert message in capsys.readouterr().err


@pytest.mark.parametrize('family', ['llama', 'mistral', 'qwen2'])
def test_generating_from_an_imported_model_follows_transformers(tmp_path, family):
  """Each greedy token is the argmax of transformers' logits (tests/reference_lm, float64)
  given the prompt and the tokens before it (within float32's error: ties aside); the
  prompt is longer than Mistral's window of 8, Qwen2's tokenizer has no bos."""
  import hf_fixtures
  import numpy as np
  import reference_lm
  from sparseformer import data
  from sparseformer.cli.eval import load_run_config
  from sparseformer.cli.generate import encode_prompt
  from sparseformer.interop.hf_import import import_model
  hf, tensors = hf_fixtures.write_model(tmp_path / 'source', family)
  import_model(str(tmp_path / 'source'), str(tmp_path / 'run'), {'model.dtype': 'float32'}, log=lambda *a: None)
  rows, code = generate(tmp_path / 'run', tmp_path, 'hf', '--prompt', 'The sliding window of ten', '--max_new_tokens',
                        '12', '--stop_tokens', '-1')
  assert code == 0
  tokenizer = data.make_tokenizer(load_run_config(str(tmp_path / 'run')).data.tokenizer)
  prompt = encode_prompt(tokenizer, 'The sliding window of ten')
  new = rows[0]['tokens']
  logits = reference_lm.hf_logits(tensors, hf, np.asarray(prompt + new))
  chosen = logits[len(prompt) - 1:-1, :tokenizer.vocab_size]  # ids past the tokenizer's are never chosen
  best = chosen.max(-1)
  scale = np.abs(logits).max()
  for step, token in enumerate(new):
    assert chosen[step, token] >= best[step] - 1e-4 * scale, (step, token)
