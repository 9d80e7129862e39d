"""Evaluate a trained run: python eval.py --workdir runs/default"""

from sparseformer.cli.eval import main

if __name__ == '__main__':
  main()
