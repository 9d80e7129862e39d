"""python -m sparseformer.cli.export_hf --workdir RUN --out DIR [--config.eval.step=K]

Writes the run's checkpoint (the latest, or eval.step) as a Hugging Face model directory
that transformers' from_pretrained loads: config.json, safetensors weights in the source's
dtype and layout, the tokenizer files of an imported source, and sparseformer.json plus
sparseformer_extra.safetensors for what transformers has no place for (each layer's
mechanism, gates and other mechanism parameters). See docs/hf_interop.md.
"""

import sys

from sparseformer.cli.eval import workdir_config_and_flags
from sparseformer.cli.main import configure_jax, run_command
from sparseformer.errors import UserError


def export_command(argv):
  loaded = workdir_config_and_flags(argv, __doc__, 'export_hf', extra=('out',))
  if loaded is None:
    return 0
  workdir, cfg, flags = loaded
  if not flags.get('out'):
    raise UserError('export_hf needs --out DIR (see --help)')
  configure_jax()
  from sparseformer import distributed
  from sparseformer.interop.hf_export import export_model
  distributed.initialize()
  export_model(workdir, cfg, flags['out'], step=cfg.eval.step or None)
  return 0


def main(argv=None):
  sys.exit(run_command(export_command, argv))


if __name__ == '__main__':
  main()
