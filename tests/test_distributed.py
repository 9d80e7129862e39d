"""Multi-process start-up decided from the environment (no real second process)."""

import jax
import pytest

from sparseformer import distributed
from sparseformer.errors import UserError

SLURM_TWO_TASKS = {'SLURM_JOB_ID': '77', 'SLURM_STEP_NODELIST': 'gpu[01-02]', 'SLURM_NTASKS': '2',
                   'SLURM_PROCID': '1', 'SLURM_LOCALID': '0'}
EXPLICIT = {'SPARSEFORMER_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'SPARSEFORMER_NUM_PROCESSES': '4',
            'SPARSEFORMER_PROCESS_ID': '2'}


@pytest.mark.parametrize('environ,cluster', [
    ({}, 'single'),
    ({'SLURM_JOB_ID': '77', 'SLURM_NTASKS': '1'}, 'single'),  # a one-task allocation
    (SLURM_TWO_TASKS, 'slurm'),
    ({'OMPI_COMM_WORLD_SIZE': '8', 'OMPI_COMM_WORLD_RANK': '3'}, 'openmpi'),
    ({'OMPI_COMM_WORLD_SIZE': '1'}, 'single'),
    ({'TPU_WORKER_HOSTNAMES': 'tpu-0,tpu-1,tpu-2,tpu-3', 'TPU_WORKER_ID': '0'}, 'tpu'),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, 'single'),  # a single-host TPU VM
    ({'MEGASCALE_COORDINATOR_ADDRESS': '10.0.0.9'}, 'tpu'),
    ({'SPARSEFORMER_DISTRIBUTED': 'auto'}, 'auto'),
    ({**SLURM_TWO_TASKS, 'SPARSEFORMER_DISTRIBUTED': 'off'}, 'single'),
    ({**SLURM_TWO_TASKS, **EXPLICIT}, 'explicit'),  # explicit variables win over the scheduler's
])
def test_the_cluster_is_detected_from_the_environment(environ, cluster):
  assert distributed.detect_launch(environ).cluster == cluster


def test_explicit_variables_are_passed_to_jax():
  launch = distributed.detect_launch(EXPLICIT)
  assert launch.arguments == {'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 2}
  assert distributed.detect_launch({**EXPLICIT, 'SPARSEFORMER_NUM_PROCESSES': '1',
                                    'SPARSEFORMER_PROCESS_ID': '0'}).is_single


@pytest.mark.parametrize('environ,fragment', [
    ({'SPARSEFORMER_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, 'missing SPARSEFORMER_NUM_PROCESSES'),
    ({**EXPLICIT, 'SPARSEFORMER_PROCESS_ID': '4'}, 'not below'),
    ({**EXPLICIT, 'SPARSEFORMER_NUM_PROCESSES': 'four'}, 'expected an integer'),
    ({**EXPLICIT, 'SPARSEFORMER_COORDINATOR_ADDRESS': '10.0.0.1'}, 'host:port'),
    ({'SLURM_JOB_ID': '77', 'SLURM_NTASKS': '2'}, 'srun'),
    ({'SPARSEFORMER_DISTRIBUTED': 'yes'}, 'use auto or off'),
])
def test_inconsistent_environments_are_user_errors(environ, fragment):
  with pytest.raises(UserError, match=fragment):
    distributed.detect_launch(environ)


def test_initialize_calls_jax_only_for_several_processes(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  assert distributed.initialize({}).is_single and calls == []
  distributed.initialize(SLURM_TWO_TASKS)
  distributed.initialize(EXPLICIT)
  assert calls == [{}, {'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 2}]


def test_initialize_reads_the_process_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  for name, value in EXPLICIT.items():
    monkeypatch.setenv(name, value)
  assert distributed.initialize().cluster == 'explicit' and calls[0]['process_id'] == 2


def test_each_process_resumes_from_its_own_data_position(monkeypatch):
  from jax.experimental import multihost_utils
  import numpy as np
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  # Process 1 has read further into its shard: its state is longer than process 0's.
  other = np.frombuffer(b'{"parent": 12345, "pairs_emitted": 7}', np.uint8)

  def allgather(x):
    x = np.asarray(x)
    if x.dtype == np.int32:
      return np.stack([x, np.array([other.size], np.int32)])
    return np.stack([x, np.pad(other, (0, x.size - other.size))])

  monkeypatch.setattr(multihost_utils, 'process_allgather', allgather)
  mine = {'parent': 3, 'pairs_emitted': 0}
  saved = distributed.gather_process_states(mine)
  assert saved == {'per_process': [mine, {'parent': 12345, 'pairs_emitted': 7}]}
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  assert distributed.own_process_state(saved) == {'parent': 12345, 'pairs_emitted': 7}
  with pytest.raises(UserError, match='single process'):
    distributed.own_process_state(mine)
  monkeypatch.setattr(jax, 'process_count', lambda: 4)
  with pytest.raises(UserError, match='resume with 2 processes'):
    distributed.own_process_state(saved)


def test_one_process_keeps_the_plain_data_position():
  state = {'parent': 3, 'pairs_emitted': 0}
  assert distributed.gather_process_states(state) == state and distributed.own_process_state(state) == state
