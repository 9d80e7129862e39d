"""Checksums of a checkpoint step's files: written when the step is saved, verified before it is read.

`checksums.json` in a step directory lists every file of the step's items with its size
and SHA-256. The Checkpointer writes it on process 0 once every process has written its files
and before orbax renames the temporary directory into place, so a step directory that
exists has its manifest (unless checkpoint.checksums was off, or the step predates them:
such a step is read unverified). Files are hashed in 1 MiB pieces; hashlib releases the
GIL, so with asynchronous saves the hashing overlaps training.
"""

import hashlib
import json
import os

from sparseformer.errors import UserError

MANIFEST = 'checksums.json'
FORMAT = 1
PIECE = 1 << 20


class DamagedCheckpoint(UserError):
  """A step that cannot be read back as saved: `file` (relative to the step, None when
  unknown) and why."""

  def __init__(self, step_dir, file, reason):
    self.step_dir, self.file, self.reason = step_dir, file, reason
    where = f'{file}: ' if file else ''
    super().__init__(f'checkpoint step {os.path.basename(step_dir)} in {os.path.dirname(step_dir)} is damaged: '
                     f'{where}{reason}')


def file_digest(path):
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while piece := f.read(PIECE):
      digest.update(piece)
  return digest.hexdigest()


def step_files(step_dir):
  """Paths relative to the step directory of the files of its items (model/, optimizer/,
  data/, meta/), sorted. Files at the top are orbax's bookkeeping, which it updates after
  the rename (_CHECKPOINT_METADATA gets the commit time), and the manifest."""
  found = []
  for directory, _, names in os.walk(step_dir):
    if os.path.samefile(directory, step_dir):
      continue
    found.extend(os.path.relpath(os.path.join(directory, name), step_dir) for name in names)
  return sorted(found)


def write_manifest(step_dir):
  """Hashes every file of a finished step and writes `checksums.json` beside them."""
  files = {rel: [os.path.getsize(os.path.join(step_dir, rel)), file_digest(os.path.join(step_dir, rel))]
           for rel in step_files(step_dir)}
  temporary = os.path.join(step_dir, MANIFEST + '.tmp')
  with open(temporary, 'w') as f:
    json.dump({'format': FORMAT, 'hash': 'sha256', 'files': files}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, os.path.join(step_dir, MANIFEST))


def read_manifest(step_dir):
  """{relative path: [size, sha256]}, or None for a step saved without checksums."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
    files = manifest['files']
    if manifest.get('format') != FORMAT or not isinstance(files, dict):
      raise ValueError(f'unknown format {manifest.get("format")!r}')
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise DamagedCheckpoint(step_dir, MANIFEST, f'unreadable ({type(e).__name__}: {e})') from None
  return files


def verify(step_dir):
  """True when every file listed in the manifest has its size and hash; False when the
  step has no manifest (not verifiable); DamagedCheckpoint naming the first bad file."""
  files = read_manifest(step_dir)
  if files is None:
    return False
  for rel, (size, digest) in sorted(files.items()):
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      raise DamagedCheckpoint(step_dir, rel, 'missing')
    actual = os.path.getsize(path)
    if actual != size:
      raise DamagedCheckpoint(step_dir, rel, f'{actual} bytes, {size} when saved')
    if file_digest(path) != digest:
      raise DamagedCheckpoint(step_dir, rel, 'contents differ from the checksum taken when it was saved')
  return True


def model_digest(step_dir):
  """One SHA-256 over the manifest entries of the `model` item (what evaluation reads), or
  None without a manifest: tells two checkpoints of one step apart."""
  files = read_manifest(step_dir)
  if files is None:
    return None
  model = {rel: entry for rel, entry in files.items() if rel.startswith('model' + os.sep)}
  return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()
