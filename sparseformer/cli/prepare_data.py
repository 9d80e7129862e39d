"""Prepare a shipped dataset (ArrayRecord) ahead of training.

    python -m sparseformer.cli.prepare_data --name=sparseformer_text/books [--data_dir=DIR]
"""

import argparse
import sys

from sparseformer.cli.main import run_command
from sparseformer.data import default_data_config
from sparseformer.data.build import DEFAULT_DATA_DIR, data_dir_of, ensure_prepared, split_sizes


def prepare_data_command(argv):
  parser = argparse.ArgumentParser(description='Prepare a shipped dataset as ArrayRecord.')
  parser.add_argument('--name', default='sparseformer_text/tinyshakespeare')
  parser.add_argument('--data_dir', default='', help=f'default: $SPARSEFORMER_DATA_DIR or {DEFAULT_DATA_DIR}')
  args = parser.parse_args(argv)
  data_cfg = default_data_config()
  data_cfg.name, data_cfg.data_dir = args.name, args.data_dir
  builder = ensure_prepared(data_cfg)
  print(f'{args.name} ready in {data_dir_of(data_cfg)}: documents per split {split_sizes(builder)}')
  return 0


def main(argv=None):
  sys.exit(run_command(prepare_data_command, argv))


if __name__ == '__main__':
  main()
