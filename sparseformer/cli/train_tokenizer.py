"""Train a SentencePiece tokenizer on a prepared dataset's train split.

    python -m sparseformer.cli.train_tokenizer --dataset=sparseformer_text/books --vocab_size=8192 --output=spm/books.model

The model reserves ids 0, 1, 2 for pad, bos, eos and falls back to bytes, so it needs a
vocabulary of a few hundred pieces at least. Use it with --config.data.tokenizer=spm:PATH.
"""

import argparse
import sys

from sparseformer.cli.main import run_command
from sparseformer.data import default_data_config
from sparseformer.data.build import open_split
from sparseformer.data.tokenizers import train_sentencepiece


def training_paragraphs(source, text_key):
  """Blank-line-separated paragraphs of every document, newlines inside kept (SentencePiece
  trains on 'sentences' of bounded length)."""
  for index in range(len(source)):
    text = source[index][text_key]
    text = text.decode('utf-8') if isinstance(text, bytes) else text
    for paragraph in text.split('\n\n'):
      if paragraph.strip():
        yield paragraph[:1 << 15] + '\n\n'



def train_tokenizer_command(argv):
  parser = argparse.ArgumentParser(description='Train a SentencePiece tokenizer on a dataset\'s train split.')
  parser.add_argument('--dataset', default='sparseformer_text/tinyshakespeare')
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--text_key', default='text')
  parser.add_argument('--vocab_size', type=int, default=8192)
  parser.add_argument('--model_type', default='bpe', choices=('bpe', 'unigram'))
  parser.add_argument('--output', required=True)
  args = parser.parse_args(argv)
  data_cfg = default_data_config()
  data_cfg.name, data_cfg.data_dir, data_cfg.text_key = args.dataset, args.data_dir, args.text_key
  source = open_split(data_cfg, data_cfg.train_split)
  path = train_sentencepiece(training_paragraphs(source, args.text_key), args.output, args.vocab_size, args.model_type)
  print(f'wrote {path}; use it with --config.data.tokenizer=spm:{path}')
  return 0


def main(argv=None):
  sys.exit(run_command(train_tokenizer_command, argv))


if __name__ == '__main__':
  main()
