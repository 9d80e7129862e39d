"""MASFormer at GPT-2-small width on the shipped books at 8192 tokens: 12 layers, d_model
768, 12 heads of 64 (12 kv heads), dense attention at layers 5 and 11 (`every:6`), a
1024-token window at the other ten (arXiv 2310.12442). The model of the issue-5 throughput
run (benchmarks/train_throughput.py, docs/results.md "Training throughput at 32k"): 85.2M
parameters with byte tokens (GPT-2's 50257-token vocabulary would make it the ~125M of
GPT-2 small). Rows of 8192 byte-tokens, batch 8, bf16 compute, no remat; the data and
schedule of configs/books_8192.py.

    python train.py --config configs/masformer_125m.py --workdir runs/masformer_125m
    python eval.py --workdir runs/masformer_125m

On several GPUs (docs/scaling.md; the batch must split over data x fsdp):

    python train.py --config configs/masformer_125m.py --workdir runs/m125_dp --config.mesh.data=-1
    python train.py --config configs/masformer_125m.py --workdir runs/m125_fsdp \\
        --config.mesh.data=1 --config.mesh.fsdp=-1
    python -m sparseformer.cli.fit --config configs/masformer_125m.py --devices 2 --platform gpu \\
        --config.mesh.data=1 --config.mesh.fsdp=2          # memory per device, on a CPU

`python benchmarks/multi_gpu.py --out runs/multi_gpu` trains it on one GPU, data parallel
and fsdp over all GPUs from the same seed, resumes across meshes and checks context
parallelism (issue 11; docs/benchmarks.md "Multi-GPU validation").

Expected: not run yet. By the issue-5 figures (82.8 ms per 32768-token step on one H100),
about 0.15 s a step on one H100 and 400 steps in about 1 minute after compiling (~60 s).
"""

import os

from sparseformer.config import load_config_file


def get_config(arg=None):
  if arg:
    raise ValueError(f'unknown preset {arg!r}; this config has none')
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'books_8192.py'))
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = 12, 768, 12, 12
  m.attention.kind = 'window:1024'
  m.attention.alternate_layers = 'every:6'
  m.attention.block_size = 128
  m.remat = 'none'
  return c
