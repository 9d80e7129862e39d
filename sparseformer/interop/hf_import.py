"""A Hugging Face model directory -> a sparseformer workdir (config.json and an orbax
checkpoint of the model at step 0) that eval.py, eval_tasks and --config.init_from take.

    DIR/config.json                       architecture and sizes (interop/hf_config.py)
    DIR/model.safetensors                 or shards named by model.safetensors.index.json
    DIR/tokenizer.json (+ tokenizer_config.json), or a SentencePiece tokenizer.model

Everything is checked before the workdir is written: the architecture and every field
that changes the computation, every tensor's presence and shape, and that no tensor is
left over. Then each parameter is read, converted and placed on the mesh on its own, so a
model is never whole on the host. The workdir keeps the source config and tokenizer in
WORKDIR/hf/ (export_hf writes the config back from there).
"""

import json
import os
import shutil

import jax
import numpy as np

from sparseformer import config as config_lib
from sparseformer import data, sharding
from sparseformer.errors import UserError
from sparseformer.interop import hf_config, hf_params
from sparseformer.interop.safetensors import SafetensorsModel
from sparseformer.model import resolve_dims
from sparseformer.training.checkpoint import Checkpointer
from sparseformer.training.state import (abstract_model_arrays, fast_random_compile, model_arrays, model_shardings,
                                        model_spec)

SOURCE_DIR = 'hf'  # WORKDIR/hf: the source config.json and tokenizer files
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model',
                   'generation_config.json')
IMPORT_STEP = 0


def read_source_config(model_dir):
  path = os.path.join(model_dir, 'config.json')
  try:
    with open(path) as f:
      return json.load(f)
  except OSError:
    raise UserError(f'{model_dir}: no config.json (give a Hugging Face model directory)') from None
  except ValueError as e:
    raise UserError(f'{path}: not JSON ({e})') from None


def import_config(hf, workdir, overrides):
  """The run config of the imported model: base_config, the model fields of the source,
  the tokenizer kept in WORKDIR/hf, then the user's --config overrides."""
  cfg = config_lib.base_config()
  for key, value in hf_config.model_overrides(hf).items():
    *parents, leaf = key.split('.')
    node = cfg
    for part in parents:
      node = node[part]
    with node.ignore_type():
      node[leaf] = value
  cfg.data.tokenizer = f'hf:{os.path.join(os.path.abspath(workdir), SOURCE_DIR)}'
  cfg.data.seq_len = min(int(hf.get('max_position_embeddings') or 2048), 2048)
  config_lib.apply_overrides(cfg, overrides)
  config_lib.validate(cfg)
  return cfg


def hf_shape(entry, shape):
  """The transformers shape of the tensor that becomes our parameter of `shape`."""
  return entry.to_hf(np.zeros(shape, np.int8)).shape


def check_tensors(tensors, entries, target, dims):
  """UserError naming the first missing, misshapen or left-over tensors."""
  missing = [e.name for e in entries if e.name not in tensors]
  if missing:
    raise UserError(f'the checkpoint lacks {len(missing)} tensors the model needs: {", ".join(missing[:4])}'
                    + (' ...' if len(missing) > 4 else ''))
  for entry in entries:
    want, got = hf_shape(entry, target[entry.path].shape), tensors.shape(entry.name)
    if tuple(got) != tuple(want):
      raise UserError(f'tensor {entry.name}: shape {tuple(got)}, the config says {tuple(want)}')
  used = {e.name for e in entries}
  left = sorted(n for n in tensors.keys() if n not in used and not hf_params.ignorable(n, dims))
  if left:
    raise UserError(f'{len(left)} tensors of the checkpoint have no place in the model: {", ".join(left[:4])}'
                    + (' ...' if len(left) > 4 else '') + ' (an architecture variant sparseformer does not import?)')


def placed(array, target):
  """A host array as a jax.Array with target's sharding: each device gets its slice."""
  return jax.make_array_from_callback(target.shape, target.sharding, lambda index: array[index])


def load_params(tensors, entries, target, log):
  """{path: jax.Array} of every entry, read and placed one at a time."""
  out = {}
  for count, entry in enumerate(entries, start=1):
    leaf = target[entry.path]
    array = entry.to_ours(tensors.read(entry.name), leaf.shape).astype(leaf.dtype)
    out[entry.path] = placed(array, leaf)
    if count % 50 == 0 or count == len(entries):
      log(f'  {count}/{len(entries)} tensors placed')
  return out


def nested(flat):
  """{('a', 0, 'b'): x} -> {'a': {0: {'b': x}}}."""
  tree = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree


def initial_mechanism_state(spec):
  """The mechanisms' state (centroids and the like) as a fresh model has it; {} when none."""
  abstract = abstract_model_arrays(spec)['mechanism_state']
  if not jax.tree.leaves(abstract):
    return jax.tree.map(lambda x: x, abstract)
  shardings = model_shardings(spec)
  init = jax.jit(lambda key: model_arrays(spec.dims, key), out_shardings=shardings)
  with fast_random_compile(shardings['params']):
    return init(jax.random.key(0))['mechanism_state']


def by_tuple_path(tree):
  """{(part, ...): leaf} of a nested dict (layer indices are int keys, as in hf_params)."""
  return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def import_model(model_dir, workdir, overrides=None, log=print):
  """Writes the workdir; returns a report {'architecture', 'parameters', 'tensors', 'step'}."""
  if os.path.exists(workdir) and os.listdir(workdir):
    raise UserError(f'{workdir} is not empty: import into a new directory')
  hf = read_source_config(model_dir)
  architecture, _ = hf_config.family(hf)
  cfg = import_config(hf, workdir, overrides or {})
  tensors = SafetensorsModel(model_dir)
  mesh = sharding.make_mesh(cfg.mesh)
  source_tokenizer = data.make_tokenizer(f'hf:{model_dir}')
  dims = resolve_dims(cfg.model, source_tokenizer.vocab_size)
  spec = model_spec(dims, mesh, tuple(cfg.mesh.rules))
  target = by_tuple_path(abstract_model_arrays(spec)['params'])
  entries = hf_params.entries(dims)
  unmapped = sorted(set(target) - {e.path for e in entries})
  if unmapped:
    raise UserError(f'parameters with no transformers counterpart: {unmapped[:3]} (import with the source\'s '
                    'dense attention, then switch mechanisms when fine-tuning)')
  check_tensors(tensors, entries, target, dims)

  # Everything is checked: from here on the workdir is written.
  source_dir = os.path.join(workdir, SOURCE_DIR)
  os.makedirs(source_dir)
  shutil.copy(os.path.join(model_dir, 'config.json'), source_dir)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(model_dir, name)):
      shutil.copy(os.path.join(model_dir, name), source_dir)
  log(f'importing {architecture} from {model_dir}: {spec.param_count / 1e6:.2f}M parameters, '
      f'{len(entries)} tensors')
  params = nested(load_params(tensors, entries, target, log))
  model = {'params': params, 'mechanism_state': initial_mechanism_state(spec)}
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=1, async_save=False)
  try:
    checkpointer.save_model(IMPORT_STEP, model, {'imported_from': os.path.abspath(model_dir),
                                                 'architecture': architecture,
                                                 'source_dtype': hf_config.source_dtype(hf)})
  finally:
    checkpointer.close()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config_lib.to_json(cfg))
  return {'architecture': architecture, 'parameters': spec.param_count, 'tensors': len(entries),
          'step': IMPORT_STEP, 'workdir': workdir}
