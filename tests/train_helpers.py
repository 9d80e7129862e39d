"""Shared by the end-to-end tests: a tiny run of the default config, in or out of process."""

import json
import os
import queue
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'default.py')

TINY = {
    'model.d_model': 32, 'model.num_layers': 2, 'model.num_heads': 2, 'model.num_kv_heads': 1,
    'data.seq_len': 32, 'train.global_batch_size': 4, 'train.steps': 8, 'train.warmup_steps': 2,
    'train.log_every': 1, 'train.eval_batches': 2, 'checkpoint.every_steps': 4,
}


def tiny_argv(workdir, data_dir, **overrides):
  fields = {**TINY, 'data.data_dir': str(data_dir), **{k.replace('__', '.'): v for k, v in overrides.items()}}
  return ['--config', DEFAULT_CONFIG, '--workdir', str(workdir)] + [f'--config.{k}={v}' for k, v in fields.items()]


def child_env(env=None):
  """The environment of a child Python: unbuffered, and the test run's own compilation cache
  (tests/conftest.py makes one per run, so children reuse each other's compiles but never
  an earlier run's)."""
  cache = os.environ.get('SPARSEFORMER_TEST_COMPILATION_CACHE', 'off')
  return {**os.environ, 'PYTHONUNBUFFERED': '1', 'SPARSEFORMER_COMPILATION_CACHE': cache, **(env or {})}


def run_script(script, argv, env=None, **kwargs):
  """Runs train.py / eval.py in a fresh Python; returns the CompletedProcess."""
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], env=child_env(env), cwd=ROOT,
                        capture_output=True, text=True, **kwargs)


def run_in_process(command, argv, capsys):
  """run_command(command, argv) in this process, as train.py / eval.py call it (no child
  Python to start, import jax and compile): a CompletedProcess of its code and output."""
  from sparseformer.cli.main import run_command
  capsys.readouterr()
  code = run_command(command, [str(a) for a in argv])
  out, err = capsys.readouterr()
  return subprocess.CompletedProcess([], code, out, err)


class TrainProcess:
  """train.py running in the background, its output read on a thread so that every wait
  has a deadline. As a context manager it kills the process on the way out."""

  def __init__(self, argv, env=None):
    self.process = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *argv], env=child_env(env), cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines = queue.Queue()  # output lines, then None at the end of the output
    self.output = []
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.process.stdout:
      self.lines.put(line)
    self.lines.put(None)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait(timeout=30)

  def wait_for_line(self, fragment, timeout):
    """The first output line that holds `fragment`; fails at the deadline or at the end of the output."""
    deadline = time.monotonic() + timeout
    while True:
      line = self._next_line(deadline)
      if line is None:
        raise AssertionError(f'the output ended without {fragment!r}:\n{self.text()}')
      if fragment in line:
        return line

  def finish(self, timeout):
    """(exit code, whole output) once the process has exited on its own."""
    deadline = time.monotonic() + timeout
    while self._next_line(deadline) is not None:
      pass
    return self.process.wait(timeout=max(deadline - time.monotonic(), 1)), self.text()

  def kill(self, timeout=30):
    self.process.kill()
    return self.process.wait(timeout=timeout)

  def text(self):
    return ''.join(self.output)

  def _next_line(self, deadline):
    try:
      line = self.lines.get(timeout=max(deadline - time.monotonic(), 0))
    except queue.Empty:
      raise AssertionError(f'no progress before the deadline:\n{self.text()}') from None
    if line is not None:
      self.output.append(line)
    return line


def logged_losses(workdir):
  """{step: training loss} from metrics.jsonl."""
  losses = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'train/loss' in record:
        losses[record['step']] = record['train/loss']
  return losses


TRAINED_FIELDS = {'train__steps': 4, 'checkpoint__every_steps': 2, 'train__eval_batches': 1}
_trained = {}


def trained_workdir(tmp_path_factory, data_dir):
  """A finished tiny run (4 steps, checkpoints at 2 and 4) trained in process, once per test
  process whichever modules ask for it: read it, or copy it to change it."""
  if 'workdir' not in _trained:
    from sparseformer.cli.main import run_command
    from sparseformer.cli.train import train_command
    workdir = tmp_path_factory.mktemp('trained') / 'run'
    assert run_command(train_command, tiny_argv(workdir, data_dir, **TRAINED_FIELDS)) == 0
    _trained['workdir'] = workdir
  return _trained['workdir']


def init_from_parameters(cfg, source, step):
  """(report, loaded, saved) of loading run `source`'s checkpoint at `step` into a fresh
  model of `cfg` through init_from: plan_init_from's report, the parameters after loading
  (fresh ones seeded 1) and the checkpoint's own, restored with cfg's shapes."""
  from sparseformer.training.assembly import assemble_train_step
  from sparseformer.training.checkpoint import Checkpointer
  from sparseformer.training.init_from import load_init_from, plan_init_from
  from sparseformer.training.setup import prepare_run
  from sparseformer.training.state import abstract_model_arrays
  spec = prepare_run(cfg).spec
  parts = assemble_train_step(cfg, spec)
  shardings = parts.state_shardings
  abstract = {'params': spec.abstract_params.to_pure_dict(),
              'mechanism_state': spec.abstract_mechanism_state.to_pure_dict()}
  checkpointer, found, report = plan_init_from(str(source), abstract)
  assert found == step, (found, step)
  fresh = parts.fresh_state(seed=1)
  loaded = load_init_from(checkpointer, step, {'params': fresh['params'], 'mechanism_state': fresh['mechanism_state']},
                          {'params': shardings['params'], 'mechanism_state': shardings['mechanism_state']},
                          shardings['step'])
  saved = Checkpointer(os.path.join(str(source), 'checkpoints'), keep=1, async_save=False, read_only=True).restore_model(
      step, abstract_model_arrays(spec))
  return report, loaded['params'], saved['params']
