"""python -m sparseformer.cli.import_hf --model_dir DIR --workdir OUT [--config.FIELD=VALUE ...]

Imports a local Hugging Face model directory (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM: config.json, safetensors weights, tokenizer.json)
into a new sparseformer workdir: its config.json and an orbax checkpoint at step 0.
Then:

    python eval.py --workdir OUT                                       # NLL on data.name
    python -m sparseformer.cli.eval_tasks --workdir OUT --config.eval.tasks="('passkey',)"
    python train.py --config configs/hf_finetune.py --workdir RUN --config.init_from=OUT

--config overrides apply to the imported run config (e.g. --config.model.param_dtype=
bfloat16 to hold a large model in half the memory, --config.mesh.fsdp=8 to shard it).
See docs/hf_interop.md.
"""

import sys

from sparseformer.cli.args import parse_args
from sparseformer.cli.main import configure_jax, run_command
from sparseformer.errors import UserError


def import_command(argv):
  flags, overrides = parse_args(argv, allowed=('model_dir', 'workdir'))
  if flags.get('help'):
    print(__doc__)
    return 0
  for name in ('model_dir', 'workdir'):
    if not flags.get(name):
      raise UserError(f'--{name} is required (see --help)')
  configure_jax()
  from sparseformer import distributed
  from sparseformer.interop.hf_import import import_model
  distributed.initialize()
  report = import_model(flags['model_dir'], flags['workdir'], overrides)
  print(f'imported {report["architecture"]} ({report["parameters"] / 1e6:.2f}M parameters, {report["tensors"]} '
        f'tensors) into {report["workdir"]} at step {report["step"]}')
  return 0


def main(argv=None):
  sys.exit(run_command(import_command, argv))


if __name__ == '__main__':
  main()
