"""sparseformer/interop/safetensors.py: files written by hand from the format's
description are read back exactly; the writer round-trips every dtype bit for bit;
shards through the index; damaged files are one clear error."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from sparseformer.errors import UserError
from sparseformer.interop import safetensors


def hand_written(path, tensors):
  """A safetensors file assembled from the format's description (no sparseformer code)."""
  header, data = {'__metadata__': {'format': 'pt'}}, b''
  for name, (code, array) in tensors.items():
    raw = array.tobytes()
    header[name] = {'dtype': code, 'shape': list(array.shape), 'data_offsets': [len(data), len(data) + len(raw)]}
    data += raw
  encoded = json.dumps(header).encode()
  path.write_bytes(struct.pack('<Q', len(encoded)) + encoded + data)


def test_reads_a_hand_written_file(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      'model.embed_tokens.weight': ('BF16', rng.normal(size=(5, 3)).astype(ml_dtypes.bfloat16)),
      'lm_head.weight': ('F32', rng.normal(size=(5, 3)).astype('<f4')),
      'model.norm.weight': ('F16', rng.normal(size=(3,)).astype('<f2')),
      'scalar': ('I64', np.array(7, '<i8')),
  }
  hand_written(tmp_path / 'model.safetensors', tensors)
  model = safetensors.SafetensorsModel(str(tmp_path))
  assert set(model.keys()) == set(tensors)
  for name, (_, array) in tensors.items():
    got = model.read(name)
    assert got.dtype == array.dtype and got.shape == array.shape
    assert got.tobytes() == array.tobytes()


@pytest.mark.parametrize('dtype', ['<f4', '<f2', ml_dtypes.bfloat16, '<f8', '<i4', '<i8', 'u1', '?'])
def test_write_then_read_is_bitwise(tmp_path, dtype):
  rng = np.random.default_rng(1)
  arrays = {'a': (rng.normal(size=(4, 6)) * 100).astype(dtype), 'b.c': (rng.normal(size=(3,))).astype(dtype),
            'empty': np.zeros((0, 2), dtype)}
  safetensors.write_file(tmp_path / 'model.safetensors', arrays, {'source': 'test'})
  raw = (tmp_path / 'model.safetensors').read_bytes()
  (size,) = struct.unpack('<Q', raw[:8])
  assert size % 8 == 0 and json.loads(raw[8:8 + size])['__metadata__'] == {'source': 'test'}
  read = safetensors.SafetensorsFile(str(tmp_path / 'model.safetensors'))
  for name, array in arrays.items():
    assert read.read(name).tobytes() == array.tobytes() and read.read(name).dtype == array.dtype


def test_streamed_writing_fetches_each_tensor_once_in_order(tmp_path):
  fetched = []

  def fetch(name):
    fetched.append(name)
    return np.full((2, 2), len(fetched), np.float32)
  safetensors.write_streamed(tmp_path / 'x.safetensors', {'z': ((2, 2), np.float32), 'a': ((2, 2), np.float32)}, fetch)
  assert fetched == ['z', 'a']
  read = safetensors.SafetensorsFile(str(tmp_path / 'x.safetensors'))
  assert read.keys() == ('z', 'a') and read.read('a')[0, 0] == 2
  with pytest.raises(ValueError, match="tensor 'z': got \\(3,\\) float32, announced \\(2, 2\\)"):
    safetensors.write_streamed(tmp_path / 'y.safetensors', {'z': ((2, 2), np.float32)}, lambda n: np.zeros(3, 'f4'))


def test_shards_through_the_index(tmp_path):
  safetensors.write_file(tmp_path / 'part-1.safetensors', {'a': np.arange(3, dtype='<f4')})
  safetensors.write_file(tmp_path / 'part-2.safetensors', {'b': np.arange(4, dtype='<i4')})
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps(
      {'metadata': {'total_size': 28}, 'weight_map': {'a': 'part-1.safetensors', 'b': 'part-2.safetensors'}}))
  model = safetensors.SafetensorsModel(str(tmp_path))
  assert sorted(model.keys()) == ['a', 'b'] and 'b' in model and model.shape('b') == (4,)
  np.testing.assert_array_equal(model.read('b'), np.arange(4))
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': {'c': 'part-1.safetensors'}}))
  with pytest.raises(UserError, match="puts 'c' in part-1.safetensors, which lacks it"):
    safetensors.SafetensorsModel(str(tmp_path))


def test_damaged_or_missing_files_are_user_errors(tmp_path):
  with pytest.raises(UserError, match='no model.safetensors or model.safetensors.index.json'):
    safetensors.SafetensorsModel(str(tmp_path))
  (tmp_path / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{not json')
  with pytest.raises(UserError, match='not a readable safetensors file'):
    safetensors.SafetensorsModel(str(tmp_path))
  hand_written(tmp_path / 'model.safetensors', {'w': ('F32', np.zeros(4, '<f4'))})
  raw = bytearray((tmp_path / 'model.safetensors').read_bytes())
  (tmp_path / 'model.safetensors').write_bytes(bytes(raw).replace(b'"shape": [4]', b'"shape": [5]'))
  with pytest.raises(UserError, match=r"tensor 'w': 16 bytes for shape \(5,\)"):
    safetensors.SafetensorsModel(str(tmp_path)).read('w')
  hand_written(tmp_path / 'model.safetensors', {'w': ('F8_E4M3', np.zeros(4, 'u1'))})
  with pytest.raises(UserError, match="tensor 'w' has dtype F8_E4M3"):
    safetensors.SafetensorsModel(str(tmp_path)).read('w')
