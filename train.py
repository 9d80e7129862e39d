"""Train a sparseformer language model: python train.py --config configs/default.py --workdir runs/default"""

from sparseformer.cli.train import main

if __name__ == '__main__':
  main()
