"""What train and eval both build from a config before touching a workdir."""

import dataclasses
from typing import Any

import jax

from sparseformer import config as config_lib
from sparseformer import data, sharding
from sparseformer.errors import UserError
from sparseformer.model import resolve_dims
from sparseformer.training.state import model_spec


@dataclasses.dataclass
class RunSetup:
  cfg: Any
  mesh: Any
  tokenizer: Any
  spec: Any  # training.state.ModelSpec
  batch_sharding: Any

  @property
  def dims(self):
    return self.spec.dims


def prepare_run(cfg, *, seq_lens=(), needs_data=True):
  """Validates the config against the devices and the data (unless `needs_data` is False:
  generation reads no dataset); raises UserError on any problem."""
  config_lib.validate(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  rules = tuple(cfg.mesh.rules)
  for seq_len, batch, micro in seq_lens:
    sharding.check_batch_fits(batch, micro, seq_len, mesh, rules)
  tokenizer = data.make_tokenizer(cfg.data.tokenizer)
  dims = resolve_dims(cfg.model, tokenizer.vocab_size)
  spec = model_spec(dims, mesh, rules)
  sharding_check(spec)
  if needs_data:
    data.ensure_prepared(cfg.data)
  return RunSetup(cfg, mesh, tokenizer, spec, sharding.batch_sharding(mesh, rules))


def sharding_check(spec):
  """Every parameter must split evenly over the mesh axes its logical axes map to."""
  spec.shardings(spec.abstract_params)


def process_info():
  return jax.process_index(), jax.process_count()


def require_divisible_by_processes(batch_size, what):
  count = jax.process_count()
  if batch_size % count:
    raise UserError(f'{what}={batch_size} is not divisible by the {count} processes')
