"""Your own documents: prepare_data --files (text and JSON Lines, .gz), the split rule,
identical files when prepared twice, every bad input as one line, damaged prepared data
(verify, a record that cannot be read, a file cut short), and a tiny end-to-end run:
train, fine-tune from it, evaluate."""

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from sparseformer import data
from sparseformer.cli.main import run_command
from sparseformer.cli.prepare_data import prepare_data_command
from sparseformer.data import build, integrity, user_files
from sparseformer.errors import UserError
from train_helpers import ROOT, child_env, run_script, tiny_argv

NAME = 'my_books'


class Exact(bytes):
  """Bytes written as they are, also to a .gz name."""


def write(path, content):
  """Writes str (UTF-8) or bytes; gzipped when the name ends in .gz (unless Exact)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  raw = content.encode('utf-8') if isinstance(content, str) else content
  gz = path.name.endswith('.gz') and not isinstance(content, Exact)
  path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
  return path


def jsonl(*records):
  return ''.join(json.dumps(record) + '\n' for record in records)


def book(index, size=600):
  line = f'Book {index}: it was a dark and stormy night; the rain fell in torrents. '
  return (line * (size // len(line) + 1))[:size] + '\n'


def make_corpus(root, books=12, notes=30, more=10):
  """books/b00.txt.. (one with a BOM and CRLF line ends), notes.jsonl (a blank line
  inside) and more.jsonl.gz; returns {doc_id: text} as the dataset should hold it."""
  expected = {}
  for i in range(books):
    text = book(i)
    raw = ('\ufeff' + text.replace('\n', '\r\n')) if i == 0 else text
    write(root / 'books' / f'b{i:02d}.txt', raw)
    expected[f'books/b{i:02d}.txt'] = text
  lines = [{'text': f'note {i}: caf\u00e9 \u2603', 'id': i} for i in range(notes)]
  body = jsonl(*lines[:5]) + '\n' + jsonl(*lines[5:])  # line 6 is blank
  write(root / 'notes.jsonl', body)
  for i, record in enumerate(lines):
    expected[f'{root.name}/notes.jsonl:{i + 1 if i < 5 else i + 2}'] = record['text']
  write(root / 'more.jsonl.gz', jsonl(*({'text': f'more {i}'} for i in range(more))))
  expected.update({f'{root.name}/more.jsonl.gz:{i + 1}': f'more {i}' for i in range(more)})
  return expected


def corpus_globs(root):
  return [str(root / 'books' / '*.txt'), str(root / 'notes.jsonl'), str(root / 'more.jsonl.gz')]


def prepare(data_dir, files, name=NAME, **options):
  return user_files.prepare(name, files, data_dir=str(data_dir), stream=io.StringIO(), **options)


def data_config(data_dir, name=NAME, **fields):
  cfg = data.default_data_config()
  cfg.name, cfg.data_dir = name, str(data_dir)
  cfg.update(fields)
  return cfg


def read_split(data_dir, split, name=NAME):
  source = build.open_split(data_config(data_dir, name), split)
  return [(source[i]['doc_id'].decode(), source[i]['text'].decode('utf-8')) for i in range(len(source))]


def cli(capsys, *argv):
  """(exit code, stdout, stderr) of prepare_data run in this process."""
  code = run_command(prepare_data_command, list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def version_dir(data_dir, name=NAME):
  return data_dir / name / '1.0.0'


def split_file(data_dir, split, name=NAME):
  return version_dir(data_dir, name) / f'{name}-{split}.array_record-00000-of-00001'


def folder_bytes(folder):
  return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """(data dir, corpus folder, {doc_id: text}) of one dataset prepared from the corpus."""
  root = tmp_path_factory.mktemp('corpus')
  expected = make_corpus(root)
  data_dir = tmp_path_factory.mktemp('tfds')
  prepare(data_dir, corpus_globs(root), validation=0.3)
  return data_dir, root, expected


# Preparing


def test_text_files_and_json_lines_become_one_dataset(prepared):
  data_dir, root, expected = prepared
  train, validation = read_split(data_dir, 'train'), read_split(data_dir, 'validation')
  assert dict(train + validation) == expected and len(train + validation) == len(expected)
  for split, documents in (('train', train), ('validation', validation)):
    assert all((user_files.hash_fraction(doc_id) < 0.3) == (split == 'validation') for doc_id, _ in documents)
    assert [doc_id for doc_id, _ in documents] == sorted(
        (doc_id for doc_id, _ in documents), key=lambda d: (d.split(':')[0], int(d.split(':')[1]) if ':' in d else 0))
  assert 5 <= len(validation) <= 25
  # The pipeline reads it by name, as it reads the shipped datasets.
  batches = list(data.eval_batches(data_config(data_dir), split='validation', seq_len=64, batch_size=2))
  assert batches and batches[0]['tokens'].shape == (2, 64)
  recorded = json.loads((version_dir(data_dir) / integrity.SIDECAR).read_text())
  sources = {source['id']: source for source in recorded['sources']}
  notes = root / 'notes.jsonl'
  assert sources[f'{root.name}/notes.jsonl']['sha256'] == hashlib.sha256(notes.read_bytes()).hexdigest()
  assert sources[f'{root.name}/notes.jsonl']['bytes'] == notes.stat().st_size
  assert sorted(recorded['files']) == [f'{NAME}-train.array_record-00000-of-00001',
                                       f'{NAME}-validation.array_record-00000-of-00001']


def test_preparing_twice_gives_identical_files(prepared, tmp_path):
  data_dir, root, _ = prepared
  again = tmp_path / 'again'
  prepare(again, list(reversed(corpus_globs(root))), validation=0.3)  # glob order does not matter
  first = folder_bytes(version_dir(data_dir))
  assert folder_bytes(version_dir(again)) == first
  prepare(again, corpus_globs(root), validation=0.3, overwrite=True)
  assert folder_bytes(version_dir(again)) == first
  assert sorted(os.listdir(again)) == [NAME]  # no build folder left behind


def test_validation_files_make_the_validation_split(tmp_path):
  for i in range(4):
    write(tmp_path / 'docs' / f'doc{i}.txt', book(i))
    write(tmp_path / 'docs' / f'held{i}.txt', book(10 + i))
  data_dir = tmp_path / 'tfds'
  prepare(data_dir, [str(tmp_path / 'docs' / '*.txt')], validation_files=[str(tmp_path / 'docs' / 'held*.txt')])
  assert [d for d, _ in read_split(data_dir, 'validation')] == [f'docs/held{i}.txt' for i in range(4)]
  assert [d for d, _ in read_split(data_dir, 'train')] == [f'docs/doc{i}.txt' for i in range(4)]


def test_a_prepared_dataset_is_replaced_only_on_request_and_only_by_a_finished_build(prepared, tmp_path, capsys):
  _, root, _ = prepared
  data_dir = tmp_path / 'tfds'
  files = ['--files', *corpus_globs(root), '--validation', '0.3']
  code, out, err = cli(capsys, '--name', NAME, *files, '--data_dir', str(data_dir))
  assert code == 0 and f'train with --config.data.name={NAME}' in out, err
  assert 'checking: 52 documents' in err and 'writing validation' in err  # progress on stderr
  before = folder_bytes(version_dir(data_dir))
  code, _, err = cli(capsys, '--name', NAME, *files, '--data_dir', str(data_dir))
  assert code == 2 and err == f'error: {NAME} is already prepared in {data_dir}; give --overwrite to replace it\n'
  write(root / 'extra' / 'bad.jsonl', '{"text": "fine"}\n{"text": 3}\n')
  code, _, err = cli(capsys, '--name', NAME, '--files', str(root / 'extra' / 'bad.jsonl'), *files, '--overwrite',
                     '--data_dir', str(data_dir))
  assert code == 2 and err.count('\n') == 1 and 'bad.jsonl line 2' in err
  assert folder_bytes(version_dir(data_dir)) == before and sorted(os.listdir(data_dir)) == [NAME]
  (root / 'extra' / 'bad.jsonl').unlink()


GOOD = 'Hello there.\n'


BAD_DOCUMENTS = [
    ('empty.txt', b'', r'empty.txt is empty$'),
    ('blank.txt', b' \n\t\r\n', r'blank.txt has only whitespace, no text$'),
    ('image.txt', b'GIF89a\x01\x00\x00\x10', r'image.txt is binary, not text \(a NUL byte at byte 7\)$'),
    ('latin1.txt', 'caf\u00e9 au lait\n'.encode('iso-8859-1'),
     r'latin1.txt is not UTF-8 \(byte 3 is e9\); convert it, e.g. iconv -f ISO-8859-1 -t UTF-8$'),
    ('cut.txt.gz', Exact(gzip.compress(b'some text\n' * 100, mtime=0)[:-6]),
     r'cut.txt.gz is not a readable gzip file \(EOFError: Compressed file ended before'),
    ('plain.txt.gz', Exact(b'not gzip at all\n'), r"plain.txt.gz is not a readable gzip file \(BadGzipFile: Not a "
     r"gzipped file \(b'no'\)\)$"),
    ('empty.jsonl', b'', r'empty.jsonl is empty$'),
    ('blanks.jsonl', b'\n  \n', r'blanks.jsonl has only blank lines, no documents$'),
    ('comma.jsonl', '{"text": "a"}\n{"text": "b",}\n', r'comma.jsonl line 2 is not JSON \(Expecting property name '
     r'enclosed in double quotes at column 14\)$'),
    ('other.jsonl', '{"body": "x", "id": 1}\n', r"other.jsonl line 1 has no 'text' key \(its keys: 'body', 'id'\); "
     r'name the text key with --text_key$'),
    ('list.jsonl', '{"text": ["a"]}\n', r"list.jsonl line 1: 'text' holds a JSON array, not a string$"),
    ('null.jsonl', '{"text": null}\n', r"null.jsonl line 1: 'text' holds a JSON null, not a string$"),
    ('array.jsonl', '["a", "b"]\n', r"array.jsonl line 1 is a JSON array, not an object with a 'text' key$"),
    ('space.jsonl', '{"text": "ok"}\n{"text": " \\n "}\n', r"space.jsonl line 2: 'text' is empty or only whitespace"),
    ('latin1.jsonl', b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
     r'latin1.jsonl line 2 is not UTF-8 \(byte 28 is e9\)'),
    ('nul.jsonl.gz', b'{"text": "ok"}\n{"text": "a\x00"}\n',
     r'nul.jsonl.gz line 2 is binary, not text \(a NUL byte at byte 26 of the decompressed text\)$'),
    ('surrogate.jsonl', '{"text": "\\ud800"}\n', r"surrogate.jsonl line 1: 'text' holds an unpaired surrogate"),
]


@pytest.mark.parametrize('file_name,content,message', BAD_DOCUMENTS, ids=[case[0] for case in BAD_DOCUMENTS])
def test_bad_documents_are_one_line_naming_the_file(tmp_path, capsys, file_name, content, message):
  write(tmp_path / 'good.txt', GOOD)
  write(tmp_path / 'held.txt', GOOD)
  bad = write(tmp_path / file_name, content)
  code, out, err = cli(capsys, '--name', NAME, '--files', str(tmp_path / 'good.txt'), str(bad),
                       '--validation_files', str(tmp_path / 'held.txt'), '--data_dir', str(tmp_path / 'tfds'))
  line = err.splitlines()[-1]
  assert code == 2 and line.startswith(f'error: {bad}') and err.endswith(line + '\n'), err
  assert [line] == [x for x in err.splitlines() if not x.startswith(('checking', 'writing'))]
  assert re.search(message, line), line
  assert not (tmp_path / 'tfds').exists()  # everything is checked before anything is written


@pytest.mark.parametrize('arguments,message', [
    (['--files', '{d}/nothing/*.txt'], r"--files '.*/nothing/\*.txt' matches no files$"),
    (['--files', '{d}/one.txt', '--validation_files', '{d}/none*.txt'],
     r"--validation_files '.*/none\*.txt' matches no files$"),
    (['--files', '{d}/one.txt'], r'--validation 0.05 leaves the validation split of 1 documents empty; choose a '
     r'larger share, or name the validation files with --validation_files$'),
    (['--files', '{d}/one.txt', '--validation_files', '{d}/one.txt'],
     r'the train split would be empty: the --validation_files are all the files$'),
    (['--files', '{d}/one.txt', '--validation', '1.5'], r'--validation 1.5: use a share of the documents in \(0, 1\)'),
    (['--files', '{d}/one.txt', '--validation', '0.1', '--validation_files', '{d}/one.txt'],
     r'give either --validation SHARE or --validation_files GLOB, not both$'),
    (['--files', '{d}/a/*.txt', '{d}/b/a/*.txt'], r"both get the doc id 'a/one.txt'"),
    (['--name', 'sparseformer_text/mine', '--files', '{d}/one.txt'],
     r'names under sparseformer_text/ are the shipped datasets; choose another name$'),
    (['--name', 'My-Books', '--files', '{d}/one.txt'], r"--name 'My-Books': use lower-case letters"),
    (['--name', '', '--files', '{d}/one.txt'], r'--files needs --name NAME'),
])
def test_bad_requests_are_one_line(tmp_path, capsys, arguments, message):
  for path in ('one.txt', 'a/one.txt', 'b/a/one.txt'):
    write(tmp_path / path, GOOD)
  argv = [a.format(d=tmp_path) for a in arguments]
  if '--name' not in argv:
    argv = ['--name', NAME] + argv
  code, _, err = cli(capsys, *argv, '--data_dir', str(tmp_path / 'tfds'))
  errors = [line for line in err.splitlines() if not line.startswith(('checking', 'writing'))]
  assert code == 2 and len(errors) == 1 and err.endswith(errors[0] + '\n'), err
  assert re.search(message, errors[0]), err
  assert not (tmp_path / 'tfds' / NAME).exists()


def test_changed_and_vanished_sources_are_warnings(tmp_path, capsys):
  for i in range(3):
    write(tmp_path / 'docs' / f'd{i}.txt', book(i))
  data_dir = tmp_path / 'tfds'
  prepare(data_dir, [str(tmp_path / 'docs' / '*.txt')], validation_files=[str(tmp_path / 'docs' / 'd2.txt')])
  (tmp_path / 'docs' / 'd0.txt').write_text(book(0).upper())  # same size, new text
  (tmp_path / 'docs' / 'd1.txt').unlink()
  data.ensure_prepared(data_config(data_dir))
  warnings = capsys.readouterr().err.splitlines()
  assert warnings == [
      f'warning: {NAME}: source {tmp_path}/docs/d0.txt changed since it was prepared; the prepared copy is used '
      f'(to use the new text, prepare {NAME} again with --overwrite)',
      f'warning: {NAME}: source {tmp_path}/docs/d1.txt is gone since it was prepared; the prepared copy is used '
      f'(to use the new text, prepare {NAME} again with --overwrite)']
  assert len(read_split(data_dir, 'train')) == 2  # still prepared and readable
  data.ensure_prepared(data_config(data_dir))
  assert capsys.readouterr().err == ''  # once per process


# Damaged prepared data


def copy_prepared(prepared, tmp_path):
  data_dir = tmp_path / 'tfds'
  shutil.copytree(prepared[0], data_dir)
  return data_dir


def flip(path, count=100):
  """Inverts `count` bytes in the middle of an ArrayRecord file's records (its first half,
  less the zero padding of its block, holds them; the index follows)."""
  raw = path.read_bytes()
  start = len(raw[:len(raw) // 2].rstrip(b'\0')) // 2
  with open(path, 'r+b') as f:
    f.seek(start)
    f.write(bytes(b ^ 0xFF for b in raw[start:start + count]))


def unreadable_records(path):
  """Record positions the ArrayRecord reader cannot read, found without our code."""
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(str(path))
  bad = []
  for position in range(reader.num_records()):
    try:
      reader.read([position])
    except RuntimeError:
      bad.append(position)
  return bad


def test_verify_lists_damaged_records_and_files_cut_short(prepared, tmp_path, capsys):
  data_dir = copy_prepared(prepared, tmp_path)
  code, out, _ = cli(capsys, '--verify', NAME, '--data_dir', str(data_dir))
  assert code == 0 and out.startswith(f'{NAME}: every record of 52 in ')
  train, validation = split_file(data_dir, 'train'), split_file(data_dir, 'validation')
  flip(train)
  bad = unreadable_records(train)
  assert bad
  with open(validation, 'r+b') as f:
    f.truncate(validation.stat().st_size // 2)
  code, out, err = cli(capsys, '--verify', NAME, '--data_dir', str(data_dir))
  lines = out.splitlines()
  assert code == 1 and f'{NAME}: {len(lines)} problems in' in err
  assert f'damaged: {train} has another sha256 than when prepared (damaged)' in lines
  reported = []
  for line in lines:
    found = re.match(f'damaged: {re.escape(str(train))}: records? (\\d+)(?:-(\\d+))? cannot be read '
                     r'\(RuntimeError: Corrupted Riegeli/records file: chunk', line)
    if found:
      reported += range(int(found[1]), int(found[2] or found[1]) + 1)
  assert reported == bad, out
  assert any(line.startswith(f'damaged: {validation} has {validation.stat().st_size} bytes') for line in lines)
  assert any(line.startswith(f'damaged: {validation}: records 0-') and 'the file is cut short' in line
             for line in lines), out
  # Any use of the dataset stops at the start, in one line naming the file cut short.
  with pytest.raises(UserError, match=f'{validation} has .* bytes, .* when prepared \\(cut short or damaged\\); '
                     'prepare it again'):
    data.ensure_prepared(data_config(data_dir))


def test_shipped_datasets_record_their_files(data_dir, capsys):
  folder = data_dir / 'sparseformer_text' / 'tinyshakespeare' / '1.0.0'
  recorded = json.loads((folder / integrity.SIDECAR).read_text())['files']
  assert sorted(recorded) == sorted(p.name for p in folder.iterdir() if '.array_record-' in p.name)
  for name, entry in recorded.items():
    assert entry == {'bytes': (folder / name).stat().st_size, 'sha256': integrity.sha256_of(folder / name)}
  code, out, _ = cli(capsys, '--verify', 'sparseformer_text/tinyshakespeare', '--data_dir', str(data_dir))
  assert code == 0 and 'every record of' in out


def test_a_file_cut_short_is_found_without_recorded_sizes(prepared, tmp_path):
  data_dir = copy_prepared(prepared, tmp_path)
  (version_dir(data_dir) / integrity.SIDECAR).unlink()  # as for a dataset prepared elsewhere
  validation = split_file(data_dir, 'validation')
  with open(validation, 'r+b') as f:
    f.truncate(validation.stat().st_size // 2)
  with pytest.raises(UserError, match=f'{validation} (indexes 0 records, dataset_info.json says \\d+|cannot be '
                     r'opened \(RuntimeError\)) \(cut short or damaged\); prepare it again'):
    data.eval_batches(data_config(data_dir), split='validation', seq_len=64, batch_size=2)


@pytest.mark.parametrize('workers', [0, 1])
def test_a_damaged_record_read_by_the_pipeline_is_one_line(prepared, tmp_path, workers):
  data_dir = copy_prepared(prepared, tmp_path)
  train = split_file(data_dir, 'train')
  flip(train)
  bad = unreadable_records(train)
  iterator = data.train_iterator(data_config(data_dir, workers=workers), seq_len=256, global_batch_size=2, seed=0)
  with pytest.raises(UserError) as raised:
    for _ in range(200):
      next(iterator)
  message = str(raised.value)
  assert '\n' not in message and message.startswith(f'{NAME}: record ')
  position = int(message.split('record ', 1)[1].split(' ', 1)[0])
  assert position in bad and f' of {train} cannot be read (RuntimeError: Corrupted Riegeli' in message
  assert message.endswith(f'`python -m sparseformer.cli.prepare_data --verify {NAME}` lists every damaged record')


# End to end


def test_files_to_training_fine_tuning_and_evaluation(tmp_path):
  """prepare_data --files, then train.py by name (default data dir from the environment),
  then fine-tune from that run in a new workdir, then eval.py on the fine-tuned run."""
  corpus = tmp_path / 'corpus'
  for i in range(8):
    write(corpus / 'books' / f'b{i}.txt', book(i, size=3000))
  env = {'SPARSEFORMER_DATA_DIR': str(tmp_path / 'tfds')}
  prepared = subprocess.run(
      [sys.executable, '-m', 'sparseformer.cli.prepare_data', '--name', NAME, '--files', f'{corpus}/books/*.txt',
       '--validation', '0.3'], env=child_env(env), cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert prepared.returncode == 0, prepared.stderr
  common = dict(data__name=NAME, train__steps=4, checkpoint__every_steps=4)
  trained = run_script('train.py', tiny_argv(tmp_path / 'run', '', **common), env=env, timeout=240)
  assert trained.returncode == 0, trained.stderr[-3000:]
  tuned = run_script('train.py', tiny_argv(tmp_path / 'tuned', '', init_from=str(tmp_path / 'run'), **common),
                     env=env, timeout=240)
  assert tuned.returncode == 0, tuned.stderr[-3000:]
  assert f'init_from {tmp_path}/run/checkpoints/4: loaded' in tuned.stdout
  evaluated = run_script('eval.py', ['--workdir', str(tmp_path / 'tuned'), '--config.eval.max_batches=1'], env=env,
                         timeout=240)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert any(name.startswith(f'{NAME}_validation_step4') for name in os.listdir(tmp_path / 'tuned' / 'eval'))
