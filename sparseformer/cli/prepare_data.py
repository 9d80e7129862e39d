"""Prepare a dataset (ArrayRecord) ahead of training, or check a prepared one.

    python -m sparseformer.cli.prepare_data --name=sparseformer_text/books [--data_dir=DIR] [--overwrite]
    python -m sparseformer.cli.prepare_data --name=my_books --files 'books/*.txt' [--files 'notes.jsonl.gz' ...]
        [--text_key=text] [--validation=0.05 | --validation_files 'held_out/*.txt'] [--data_dir=DIR] [--overwrite]
    python -m sparseformer.cli.prepare_data --verify=my_books [--data_dir=DIR]

--files: plain text files (one document each) and JSON Lines (.jsonl, one document per
line under --text_key), either possibly .gz; see sparseformer/data/user_files.py for the
doc ids, the split rule and the checks. --verify reads every record of every split and
lists the damaged ones (file, record index); exit code 1 if there are any.
"""

import argparse
import sys

from sparseformer.cli.main import run_command
from sparseformer.data import default_data_config
from sparseformer.data.build import DEFAULT_DATA_DIR, data_dir_of, ensure_prepared, split_sizes
from sparseformer.errors import UserError

SHIPPED_DEFAULT = 'sparseformer_text/tinyshakespeare'


def parser():
  p = argparse.ArgumentParser(prog='python -m sparseformer.cli.prepare_data',
                              description='Prepare a dataset as ArrayRecord, or verify a prepared one.')
  p.add_argument('--name', default=None, help=f'dataset name (default {SHIPPED_DEFAULT}; required with --files)')
  p.add_argument('--files', nargs='+', action='extend', default=[], metavar='GLOB',
                 help='text (.txt, any other name) and JSON Lines (.jsonl) files, .gz allowed; repeatable')
  p.add_argument('--validation_files', nargs='+', action='extend', default=[], metavar='GLOB',
                 help='files of the validation split (instead of --validation)')
  p.add_argument('--validation', type=float, default=None,
                 help='share of the documents in validation, by a hash of the doc id (default 0.05)')
  p.add_argument('--text_key', default='text', help="JSON Lines: the key of the document's text (default text)")
  p.add_argument('--overwrite', action='store_true', help='replace a prepared dataset of that name')
  p.add_argument('--verify', default=None, metavar='NAME', help='read every record of a prepared dataset')
  p.add_argument('--data_dir', default='', help=f'default: $SPARSEFORMER_DATA_DIR or {DEFAULT_DATA_DIR}')
  return p


def data_config(name, data_dir):
  data_cfg = default_data_config()
  data_cfg.name, data_cfg.data_dir = name, data_dir
  return data_cfg


def prepare_data_command(argv):
  args = parser().parse_args(argv)
  if args.verify:
    return verify_command(args)
  if args.files or args.validation_files:
    return prepare_files(args)
  data_cfg = data_config(args.name or SHIPPED_DEFAULT, args.data_dir)
  from sparseformer.data import build
  if args.overwrite and build.is_shipped(data_cfg.name):
    build.build_shipped(data_cfg.name, data_dir_of(data_cfg), overwrite=True)
  builder = ensure_prepared(data_cfg)
  print(f'{data_cfg.name} ready in {data_dir_of(data_cfg)}: documents per split {split_sizes(builder)}')
  return 0


def prepare_files(args):
  from sparseformer.data import user_files
  if not args.name:
    raise UserError('--files needs --name NAME, the name to train with (--config.data.name=NAME)')
  data_dir = data_dir_of(data_config(args.name, args.data_dir))
  builder = user_files.prepare(args.name, args.files, data_dir=data_dir, validation=args.validation,
                               validation_files=args.validation_files, text_key=args.text_key,
                               overwrite=args.overwrite)
  print(f'{args.name} ready in {data_dir}: documents per split {split_sizes(builder)}; '
        f'train with --config.data.name={args.name}')
  return 0


def verify_command(args):
  from sparseformer.data import build, integrity
  data_dir = data_dir_of(data_config(args.verify, args.data_dir))
  builder = build.locate(args.verify, data_dir)
  integrity.warn_changed_sources(str(builder.data_dir), args.verify)
  problems = integrity.verify(builder, args.verify)
  for line in problems:
    print(f'damaged: {line}')
  if problems:
    how = integrity.again(args.verify, verify=False)
    print(f'{args.verify}: {len(problems)} problems in {builder.data_dir}; {how}', file=sys.stderr)
    return 1
  sizes = split_sizes(builder)
  print(f'{args.verify}: every record of {sum(sizes.values())} in {builder.data_dir} reads back {sizes}')
  return 0


def main(argv=None):
  sys.exit(run_command(prepare_data_command, argv))


if __name__ == '__main__':
  main()
