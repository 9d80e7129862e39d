"""Prepare a shipped dataset (ArrayRecord) ahead of training.

    python -m sparseformer.cli.prepare_data --name=sparseformer_text/books [--data_dir=DIR]
"""

import argparse
import sys

from sparseformer.cli.main import run_command
from sparseformer.data import default_data_config
from sparseformer.data.build import data_dir_of, ensure_prepared


def prepare_data_command(argv):
  parser = argparse.ArgumentParser(description='Prepare a shipped dataset as ArrayRecord.')
  parser.add_argument('--name', default='sparseformer_text/tinyshakespeare')
  parser.add_argument('--data_dir', default='')
  args = parser.parse_args(argv)
  data_cfg = default_data_config()
  data_cfg.name, data_cfg.data_dir = args.name, args.data_dir
  info = ensure_prepared(data_cfg).info
  counts = {split: info.splits[split].num_examples for split in info.splits}
  print(f'{args.name} ready in {data_dir_of(data_cfg)}: {counts} documents')
  return 0


def main(argv=None):
  sys.exit(run_command(prepare_data_command, argv))


if __name__ == '__main__':
  main()
