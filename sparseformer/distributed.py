"""Multi-process start-up: `jax.distributed.initialize()` when the job runs as several processes.

`initialize()` decides from the environment, in this order:
  1. SPARSEFORMER_DISTRIBUTED=off: one process, nothing to initialise (even on a cluster).
  2. explicit: SPARSEFORMER_COORDINATOR_ADDRESS (host:port of process 0),
     SPARSEFORMER_NUM_PROCESSES and SPARSEFORMER_PROCESS_ID, all three.
  3. SLURM (srun): SLURM_JOB_ID, SLURM_NTASKS > 1, SLURM_PROCID, SLURM_LOCALID and
     SLURM_STEP_NODELIST; jax finds the coordinator from the node list.
  4. Open MPI (mpirun): OMPI_COMM_WORLD_SIZE > 1; jax reads the rank and the coordinator.
  5. Cloud TPU pod slices and multislice: TPU_WORKER_HOSTNAMES naming several hosts,
     TPU_PROCESS_ADDRESSES or MEGASCALE_COORDINATOR_ADDRESS; jax asks the TPU metadata.
  6. SPARSEFORMER_DISTRIBUTED=auto: jax's own detection whatever the variables say (e.g. a
     TPU VM whose worker list only the metadata server knows).
Otherwise, and for a single process, it does nothing. Call it before anything touches a
jax device.
"""

import dataclasses
import json
import os

import numpy as np

from sparseformer.errors import UserError

EXPLICIT_VARIABLES = ('SPARSEFORMER_COORDINATOR_ADDRESS', 'SPARSEFORMER_NUM_PROCESSES', 'SPARSEFORMER_PROCESS_ID')
SLURM_VARIABLES = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
MODES = ('', 'auto', 'off')


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process was started: `cluster` is single, explicit, slurm, openmpi, tpu or
  auto; `arguments` are those jax.distributed.initialize gets (empty: jax detects)."""
  cluster: str
  arguments: dict = dataclasses.field(default_factory=dict)

  @property
  def is_single(self):
    return self.cluster == 'single'


def positive_int(environ, name, minimum=1):
  text = environ.get(name, '')
  if not text.strip().isdigit() or int(text) < minimum:
    raise UserError(f'{name}={text!r}: expected an integer >= {minimum}')
  return int(text)


def explicit_launch(environ):
  missing = [name for name in EXPLICIT_VARIABLES if not environ.get(name)]
  if missing:
    raise UserError(f'set all of {", ".join(EXPLICIT_VARIABLES)} or none; missing {", ".join(missing)}')
  count = positive_int(environ, 'SPARSEFORMER_NUM_PROCESSES')
  index = positive_int(environ, 'SPARSEFORMER_PROCESS_ID', minimum=0)
  if index >= count:
    raise UserError(f'SPARSEFORMER_PROCESS_ID={index} is not below SPARSEFORMER_NUM_PROCESSES={count}')
  if count == 1:
    return Launch('single')
  address = environ['SPARSEFORMER_COORDINATOR_ADDRESS']
  if ':' not in address:
    raise UserError(f'SPARSEFORMER_COORDINATOR_ADDRESS={address!r}: expected host:port of process 0')
  return Launch('explicit', {'coordinator_address': address, 'num_processes': count, 'process_id': index})


def slurm_launch(environ):
  if 'SLURM_JOB_ID' not in environ or int(environ.get('SLURM_NTASKS', '1') or 1) <= 1:
    return None
  missing = [name for name in SLURM_VARIABLES if name not in environ]
  if missing:
    raise UserError(f'a SLURM job of {environ["SLURM_NTASKS"]} tasks without {", ".join(missing)}: '
                    'start every task with srun (or set SPARSEFORMER_DISTRIBUTED=off)')
  return Launch('slurm')


def openmpi_launch(environ):
  if int(environ.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return Launch('openmpi')
  return None


def tpu_launch(environ):
  hosts = [h for h in environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h.strip()]
  if len(hosts) > 1 or environ.get('TPU_PROCESS_ADDRESSES') or environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return Launch('tpu')
  return None


def detect_launch(environ=None):
  """The Launch the environment describes (see the module docstring)."""
  environ = os.environ if environ is None else environ
  mode = environ.get('SPARSEFORMER_DISTRIBUTED', '')
  if mode not in MODES:
    raise UserError(f'SPARSEFORMER_DISTRIBUTED={mode!r}: use auto or off (or leave it unset)')
  if mode == 'off':
    return Launch('single')
  if any(environ.get(name) for name in EXPLICIT_VARIABLES):
    return explicit_launch(environ)
  for detect in (slurm_launch, openmpi_launch, tpu_launch):
    launch = detect(environ)
    if launch is not None:
      return launch
  return Launch('auto') if mode == 'auto' else Launch('single')


def initialize(environ=None):
  """Starts jax's distributed runtime if this is one process of several; returns the Launch."""
  import jax
  launch = detect_launch(environ)
  if not launch.is_single and not jax.distributed.is_initialized():
    jax.distributed.initialize(**launch.arguments)
  return launch


def is_main_process():
  """Process 0 writes logs, metrics and run metadata; every process joins checkpoints."""
  import jax
  return jax.process_index() == 0


def gather_process_states(state):
  """Every process's JSON-able data-iterator state, for process 0 to checkpoint: the
  state itself with one process, else {'per_process': [state of process 0, 1, ...]}.
  A collective: every process calls it at the same step."""
  import jax
  if jax.process_count() == 1:
    return state
  from jax.experimental import multihost_utils
  encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([encoded.size], np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:encoded.size] = encoded
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return {'per_process': [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]}


def own_process_state(saved):
  """This process's part of a state written by `gather_process_states`."""
  import jax
  if not (isinstance(saved, dict) and 'per_process' in saved):
    if jax.process_count() > 1:
      raise UserError('the checkpoint holds the data position of a single process; resume it with one process')
    return saved
  states = saved['per_process']
  if len(states) != jax.process_count():
    raise UserError(f'the checkpoint holds the data positions of {len(states)} processes, this job has '
                    f'{jax.process_count()}: resume with {len(states)} processes')
  return states[jax.process_index()]


def sync(name):
  """A barrier of every process of the job (nothing to wait for with one)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def host_device_flags(count, xla_flags=''):
  """XLA_FLAGS that make jax see `count` CPU devices, the other flags of `xla_flags` kept."""
  kept = [flag for flag in xla_flags.split() if 'xla_force_host_platform_device_count' not in flag]
  return ' '.join(kept + [f'--xla_force_host_platform_device_count={count}'])
