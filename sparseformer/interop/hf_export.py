"""A sparseformer workdir -> a Hugging Face model directory that transformers loads.

    OUT/config.json                  the source's config.json (imported runs, and runs
                                     fine-tuned from them), with a changed RoPE scaling
                                     written in; else a LlamaForCausalLM config
    OUT/model.safetensors            or shards and model.safetensors.index.json, in the
                                     source's dtype (transformers' names and layouts)
    OUT/tokenizer files              copied from the source, when there is one
    OUT/sparseformer.json            what transformers cannot express: each layer's
                                     mechanism and the attention options, the step
    OUT/sparseformer_extra.safetensors  parameters and mechanism state with no
                                     transformers counterpart (gates, routers, centroids),
                                     under their sparseformer paths ('blocks/0/...')

Values are converted by transposes and reshapes only and cast to the source dtype, so an
imported model exported unchanged gives back its tensors bit for bit.
"""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np

from sparseformer import data, sharding
from sparseformer.errors import UserError
from sparseformer.interop import hf_config, hf_params
from sparseformer.interop.hf_import import SOURCE_DIR, TOKENIZER_FILES
from sparseformer.interop.safetensors import INDEX_FILE, SINGLE_FILE, write_streamed
from sparseformer.model import resolve_dims
from sparseformer.training.checkpoint import Checkpointer
from sparseformer.training.state import abstract_model_arrays, model_spec

EXTRA_FILE = 'sparseformer_extra.safetensors'
MECHANISM_FILE = 'sparseformer.json'
DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16), 'float16': np.dtype(np.float16)}
MAX_SHARD_BYTES = 5 << 30  # transformers' default shard size


def source_directory(workdir, cfg):
  """The folder of the source config.json and tokenizer: the workdir's own (an import),
  or that of the tokenizer the run used (a run fine-tuned from an import); None."""
  candidates = [os.path.join(workdir, SOURCE_DIR)]
  if cfg.data.tokenizer.startswith('hf:'):
    candidates.append(cfg.data.tokenizer[len('hf:'):])
  return next((c for c in candidates if os.path.isfile(os.path.join(c, 'config.json'))), None)


def host_array(array):
  """The whole value of a (possibly sharded, multi-process) jax.Array on this host."""
  if not array.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(jax.device_get(array))


def flat(tree, prefix=()):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def shard_plan(specs, max_bytes):
  """[[names of shard 1], ...]: tensors in order, a new shard when one would pass max_bytes."""
  shards, size = [[]], 0
  for name, (shape, dtype) in specs.items():
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  return shards


def write_weights(out, specs, fetch, max_bytes):
  plan = shard_plan(specs, max_bytes)
  if len(plan) == 1:
    write_streamed(os.path.join(out, SINGLE_FILE), specs, fetch, {'format': 'pt'})
    return [SINGLE_FILE]
  files, weight_map = [], {}
  for k, names in enumerate(plan):
    name = f'model-{k + 1:05d}-of-{len(plan):05d}.safetensors'
    write_streamed(os.path.join(out, name), {n: specs[n] for n in names}, fetch, {'format': 'pt'})
    weight_map.update({n: name for n in names})
    files.append(name)
  total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for s, d in specs.values())
  with open(os.path.join(out, INDEX_FILE), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  return files


def export_model(workdir, cfg, out, *, step=None, max_shard_bytes=MAX_SHARD_BYTES, log=print):
  """Writes OUT from the run's checkpoint at `step` (None: the latest); returns a report."""
  if os.path.exists(out) and os.listdir(out):
    raise UserError(f'{out} is not empty: export into a new directory')
  source = source_directory(workdir, cfg)
  dims = resolve_dims(cfg.model, data.make_tokenizer(cfg.data.tokenizer).vocab_size)
  if dims.short_conv:
    raise UserError(f'model.short_conv={dims.short_conv}: this model has a convolution before each attention, which '
                    'Llama and Qwen lack; it cannot be exported to transformers')
  if source:
    with open(os.path.join(source, 'config.json')) as f:
      hf = hf_config.updated_source_config(json.load(f), dims)
    dtype_name = hf_config.source_dtype(hf)
  else:
    dtype_name = 'float32' if cfg.model.param_dtype == 'float32' else cfg.model.param_dtype
    hf = hf_config.llama_config(dims, dtype_name)
  if dtype_name not in DTYPES:
    raise UserError(f'the source dtype {dtype_name!r} is not one sparseformer writes ({", ".join(DTYPES)})')
  dtype = DTYPES[dtype_name]
  spec = model_spec(dims, sharding.make_mesh(cfg.mesh), tuple(cfg.mesh.rules))
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=1, async_save=False, read_only=True)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise UserError(f'no finished checkpoint in {workdir}/checkpoints')
    arrays = checkpointer.checked(step, lambda: checkpointer.restore_model(step, abstract_model_arrays(spec)), log)
  finally:
    checkpointer.close()
  params = flat(arrays['params'])
  entries = hf_params.entries(dims)
  by_name = {e.name: e for e in entries}
  specs = {e.name: (e.to_hf(np.zeros(params[e.path].shape, np.int8)).shape, dtype) for e in entries}

  def fetch(name):
    entry = by_name[name]
    return entry.to_hf(host_array(params[entry.path])).astype(dtype)

  os.makedirs(out, exist_ok=True)
  files = write_weights(out, specs, fetch, max_shard_bytes)
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  if source:
    for name in TOKENIZER_FILES:
      if name != 'config.json' and os.path.isfile(os.path.join(source, name)):
        shutil.copy(os.path.join(source, name), out)
  extra = write_extra(out, params, flat(arrays['mechanism_state']), {e.path for e in entries})
  describe_mechanisms(out, cfg, dims, workdir, step, extra, source)
  log(f'exported step {step} of {workdir} to {out}: {len(entries)} tensors ({dtype_name}) in {len(files)} file(s)'
      + (f', {len(extra)} sparseformer-only tensors in {EXTRA_FILE}' if extra else ''))
  return {'step': step, 'files': files, 'tensors': len(entries), 'extra': extra, 'dtype': dtype_name}


def write_extra(out, params, mechanism_state, mapped):
  """Parameters without a transformers counterpart and the mechanism state, as float32
  (or their own dtype) under 'params/blocks/0/...' and 'mechanism_state/...' names."""
  extra = {('params',) + path: value for path, value in params.items() if path not in mapped}
  extra.update({('mechanism_state',) + path: value for path, value in mechanism_state.items()})
  if not extra:
    return []
  names = {'/'.join(map(str, path)): value for path, value in extra.items()}
  write_streamed(os.path.join(out, EXTRA_FILE), {n: (v.shape, v.dtype) for n, v in names.items()},
                 lambda n: host_array(names[n]))
  return sorted(names)


def describe_mechanisms(out, cfg, dims, workdir, step, extra, source):
  non_dense = sorted({m for m in dims.layer_mechanisms if m != 'dense' and not m.startswith('window:')})
  description = {
      'exported_from': os.path.abspath(workdir), 'step': step, 'source': source,
      'layer_mechanisms': list(dims.layer_mechanisms),
      'attention': cfg.model.attention.to_dict(),
      'extra_tensors': extra,
      'note': ('transformers runs every layer with its own attention (dense, or the sliding window of the '
               'config); layers whose mechanism is listed in layer_mechanisms as sparse compute differently '
               'there' if non_dense else 'every layer is dense (or the config\'s sliding window) in both'),
  }
  with open(os.path.join(out, MECHANISM_FILE), 'w') as f:
    json.dump(description, f, indent=2, default=str)
