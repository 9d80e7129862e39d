"""The workdir outside the checkpoints: its path, the training lock, the config and its history.

- `check_path`: --workdir must be (or be creatable as) a writable directory.
- `train.lock`: one train.py per workdir. The holder keeps an flock on the file and has
  written its pid, host and start time into it; a second train.py names them and stops.
  The kernel drops the flock when its holder dies however it dies, so a file whose lock
  is free but which still names a holder is stale: it is taken over with a note. The
  file is never deleted (deleting a lock file races with its next taker); a clean exit
  empties it. Where the filesystem has no flock, the holder's pid is checked instead.
- `config.json` is the config of the latest launch; `config_history.jsonl` gets one line
  per launch (the step it started at, the time, the config, the fields that changed), and
  the changed fields are printed.
"""

import datetime
import errno
import fcntl
import json
import os
import socket

from sparseformer import config as config_lib
from sparseformer.errors import UserError

LOCK = 'train.lock'
HISTORY = 'config_history.jsonl'
CHANGES_SHOWN = 10
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def check_path(workdir):
  """UserError unless `workdir` is a directory, or can be made one, that this process may write."""
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'--workdir {workdir} is a file, not a directory')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f'--workdir {workdir}: {existing} is a file, not a directory')
  for directory in (existing, os.path.join(path, 'checkpoints')):
    if os.path.isdir(directory) and not os.access(directory, os.W_OK | os.X_OK):
      raise UserError(f'--workdir {workdir}: {directory} is not writable by this user')


# ---------------------------------------------------------------------------------------
# The lock


def now():
  return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


def describe(holder):
  return f'pid {holder.get("pid")} on host {holder.get("host")} (started {holder.get("started")})'


def read_holder(fd):
  """The holder recorded in an open lock file, {} if none (empty or unreadable)."""
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode(errors='replace')
  try:
    holder = json.loads(text) if text.strip() else {}
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def in_use_error(workdir, holder):
  who = describe(holder) if holder else 'another process'
  return UserError(f'{workdir} is in use by a training run: {who} holds {os.path.join(workdir, LOCK)}; '
                   'wait for it to finish or stop it (a lock whose holder is gone is taken over)')


def try_flock(fd, kind):
  """True if taken, False if another process holds it, None where the filesystem has no flock."""
  try:
    fcntl.flock(fd, kind | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  except OSError as e:
    if e.errno in NO_FLOCK:
      return None
    raise
  return True


def pid_alive(pid):
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, TypeError):
    return True
  return True


def holder_running(holder):
  """Without flock: a holder on another host may be running; on this host, if its pid is."""
  if not holder:
    return False
  return holder.get('host') != socket.gethostname() or pid_alive(holder.get('pid'))


def check_unlocked(workdir):
  """UserError naming the holder if a training run holds the workdir's lock (writes nothing)."""
  path = os.path.join(workdir, LOCK)
  if not os.path.isfile(path):
    return
  fd = os.open(path, os.O_RDONLY)
  try:
    taken = try_flock(fd, fcntl.LOCK_SH)
    if taken is False or (taken is None and holder_running(read_holder(fd))):
      raise in_use_error(workdir, read_holder(fd))
  finally:
    os.close(fd)  # drops the probe's shared lock


class WorkdirLock:
  """The workdir's train.lock, held from `acquire` to `release`."""

  def __init__(self, workdir, fd):
    self.workdir, self.fd = workdir, fd

  @classmethod
  def acquire(cls, workdir, log=print):
    fd = os.open(os.path.join(workdir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      previous = read_holder(fd)
      taken = try_flock(fd, fcntl.LOCK_EX)
      if taken is False or (taken is None and holder_running(previous)):
        raise in_use_error(workdir, read_holder(fd))
      if previous:
        log(f'note: took over the lock of {workdir} from {describe(previous)}, which is no longer running')
      me = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': now()}
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(me) + '\n').encode(), 0)
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    return cls(workdir, fd)

  def release(self):
    if self.fd is None:
      return
    os.ftruncate(self.fd, 0)  # empty: nobody holds it
    os.close(self.fd)
    self.fd = None


# ---------------------------------------------------------------------------------------
# The config and its history


def plain(cfg):
  """{'a.b': value} of a config, values as JSON gives them back (tuples -> lists)."""
  return json.loads(json.dumps(config_lib.flatten(cfg)))


def previous_config(workdir):
  """The config dict of the last launch from config.json, or None (absent or unreadable)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)['config']
  except (OSError, ValueError, KeyError, TypeError):
    return None


def changed_fields(old, new):
  """{'a.b': (old, new)} of the fields whose values differ (flattened dicts)."""
  return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def format_changes(changes, start_step):
  lines = [f'config changed since the last launch (this one starts at step {start_step}; '
           f'every launch\'s config is in {HISTORY}):']
  lines += [f'  {key}: {old!r} -> {new!r}' for key, (old, new) in list(changes.items())[:CHANGES_SHOWN]]
  if len(changes) > CHANGES_SHOWN:
    lines.append(f'  ... and {len(changes) - CHANGES_SHOWN} more')
  return lines


def append_history(workdir, record):
  with open(os.path.join(workdir, HISTORY), 'a') as f:
    f.write(json.dumps(record) + '\n')


def record_config(workdir, cfg, start_step, log=print):
  """Writes config.json, appends this launch to config_history.jsonl and logs the fields
  that changed since the last launch (process 0 only)."""
  import ml_collections
  old = previous_config(workdir)
  new = cfg.to_dict()
  changes = changed_fields(plain(ml_collections.ConfigDict(old)), plain(cfg)) if old is not None else {}
  if old is not None and not os.path.exists(os.path.join(workdir, HISTORY)):
    append_history(workdir, {'start_step': None, 'time': None, 'config': old,
                             'note': 'config.json of a launch before the history was kept'})
  append_history(workdir, {'start_step': start_step, 'time': now(), 'config': json.loads(json.dumps(new)),
                           'changed': {key: list(pair) for key, pair in changes.items()}})
  if changes:
    for line in format_changes(changes, start_step):
      log(line)
  temporary = os.path.join(workdir, 'config.json.tmp')
  with open(temporary, 'w') as f:
    f.write(config_lib.to_json(cfg))
  os.replace(temporary, os.path.join(workdir, 'config.json'))
