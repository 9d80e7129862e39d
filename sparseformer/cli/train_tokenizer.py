"""Train a SentencePiece tokenizer on a prepared dataset's train split.

    python -m sparseformer.cli.train_tokenizer --dataset=sparseformer_text/books --vocab_size=8192 --output=spm/books.model

The model reserves ids 0, 1, 2 for pad, bos, eos and falls back to bytes, so it needs a
vocabulary of a few hundred pieces at least. Use it with --config.data.tokenizer=spm:PATH.
"""

import argparse
import sys

from sparseformer.cli.main import run_command
from sparseformer.data import default_data_config
from sparseformer.data.tokenizers import train_from_dataset


def train_tokenizer_command(argv):
  parser = argparse.ArgumentParser(description='Train a SentencePiece tokenizer on a dataset\'s train split.')
  parser.add_argument('--dataset', default='sparseformer_text/tinyshakespeare')
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--text_key', default='text')
  parser.add_argument('--vocab_size', type=int, default=8192)
  parser.add_argument('--model_type', default='bpe', choices=('bpe', 'unigram'))
  parser.add_argument('--output', required=True, help='path of the .model file to write')
  args = parser.parse_args(argv)
  data_cfg = default_data_config()
  data_cfg.name, data_cfg.data_dir, data_cfg.text_key = args.dataset, args.data_dir, args.text_key
  spec = train_from_dataset(data_cfg, args.output, args.vocab_size, args.model_type)
  print(f'wrote {spec[len("spm:"):]}; use it with --config.data.tokenizer={spec}')
  return 0


def main(argv=None):
  sys.exit(run_command(train_tokenizer_command, argv))


if __name__ == '__main__':
  main()
