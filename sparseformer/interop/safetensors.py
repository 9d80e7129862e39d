"""Reading and writing the safetensors format (huggingface/safetensors, docs/format):
an 8-byte little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and [begin, end) byte offsets into the data that follows, and the raw
little-endian, row-major tensor bytes. A model too large for one file is split into
shards named by `model.safetensors.index.json` ({"weight_map": {name: file}}).

Reading maps the file and copies out one tensor at a time, so a model is never held on
the host all at once; writing streams tensors into the file in header order.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

from sparseformer.errors import UserError

DTYPES = {
    'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'), 'BF16': np.dtype(ml_dtypes.bfloat16),
    'I64': np.dtype('<i8'), 'I32': np.dtype('<i4'), 'I16': np.dtype('<i2'), 'I8': np.dtype('i1'),
    'U8': np.dtype('u1'), 'BOOL': np.dtype('?'),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'
MAX_HEADER_BYTES = 100 << 20


class SafetensorsFile:
  """One .safetensors file: names, shapes and dtypes from its header; `read(name)` copies
  one tensor out of the memory-mapped data."""

  def __init__(self, path):
    self.path = path
    try:
      with open(path, 'rb') as f:
        (size,) = struct.unpack('<Q', f.read(8))
        if size > MAX_HEADER_BYTES:
          raise ValueError(f'a header of {size} bytes')
        header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
      raise UserError(f'{path}: not a readable safetensors file ({e})') from None
    self.metadata = header.pop('__metadata__', {}) or {}
    self.entries = header
    self.data_start = 8 + size
    self.data = np.memmap(path, np.uint8, 'r') if os.path.getsize(path) > self.data_start else np.zeros(0, np.uint8)

  def keys(self):
    return tuple(self.entries)

  def dtype(self, name):
    code = self.entries[name]['dtype']
    if code not in DTYPES:
      raise UserError(f'{self.path}: tensor {name!r} has dtype {code}, which sparseformer does not read')
    return DTYPES[code]

  def shape(self, name):
    return tuple(self.entries[name]['shape'])

  def read(self, name):
    """The tensor `name` as a NumPy array of its stored dtype (a copy)."""
    begin, end = self.entries[name]['data_offsets']
    dtype, shape = self.dtype(name), self.shape(name)
    if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise UserError(f'{self.path}: tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype}')
    raw = self.data[self.data_start + begin:self.data_start + end]
    return np.frombuffer(raw.tobytes(), dtype).reshape(shape)


class SafetensorsModel:
  """Every tensor of a model directory: `model.safetensors`, or the shards that
  `model.safetensors.index.json` names."""

  def __init__(self, model_dir):
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)['weight_map']
      files = {name: os.path.join(model_dir, shard) for name, shard in weight_map.items()}
    elif os.path.exists(os.path.join(model_dir, SINGLE_FILE)):
      files = None
    else:
      raise UserError(f'{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are read)')
    self.shards = {}
    if files is None:
      single = SafetensorsFile(os.path.join(model_dir, SINGLE_FILE))
      self.shards[single.path] = single
      self.where = {name: single for name in single.keys()}
    else:
      self.where = {}
      for name, path in files.items():
        if path not in self.shards:
          self.shards[path] = SafetensorsFile(path)
        if name not in self.shards[path].entries:
          raise UserError(f'{index_path} puts {name!r} in {os.path.basename(path)}, which lacks it')
        self.where[name] = self.shards[path]

  def keys(self):
    return tuple(self.where)

  def __contains__(self, name):
    return name in self.where

  def shape(self, name):
    return self.where[name].shape(name)

  def dtype(self, name):
    return self.where[name].dtype(name)

  def read(self, name):
    return self.where[name].read(name)


def write_file(path, tensors, metadata=None):
  """Writes `tensors` ({name: array}) to `path`."""
  arrays = {name: np.asarray(value) for name, value in tensors.items()}
  write_streamed(path, {name: (a.shape, a.dtype) for name, a in arrays.items()}, arrays.__getitem__, metadata)


def write_streamed(path, specs, fetch, metadata=None):
  """Writes the tensors `specs` announces ({name: (shape, dtype)}, in file order), each
  made by `fetch(name)` only when its turn comes, so that a large model is never whole on
  the host."""
  header, offset = {}, 0
  for name, (shape, dtype) in specs.items():
    dtype = np.dtype(dtype)
    if dtype not in DTYPE_NAMES:
      raise ValueError(f'tensor {name!r}: dtype {dtype} has no safetensors name')
    size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    header[name] = {'dtype': DTYPE_NAMES[dtype], 'shape': [int(n) for n in shape],
                    'data_offsets': [offset, offset + size]}
    offset += size
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  encoded = json.dumps(header, separators=(',', ':')).encode('utf-8')
  encoded += b' ' * (-len(encoded) % 8)  # the data starts 8-byte aligned
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(encoded)))
    f.write(encoded)
    for name, (shape, dtype) in specs.items():
      array = np.asarray(fetch(name))
      if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise ValueError(f'tensor {name!r}: got {array.shape} {array.dtype}, announced {tuple(shape)} {dtype}')
      f.write(np.ascontiguousarray(array).astype(np.dtype(dtype).newbyteorder('<'), copy=False).tobytes())
