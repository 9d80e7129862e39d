import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """The shipped tinyshakespeare dataset, prepared once per test session."""
  from sparseformer import data
  directory = tmp_path_factory.mktemp('tensorflow_datasets')
  cfg = data.default_data_config()
  cfg.data_dir = str(directory)
  data.ensure_prepared(cfg)
  return directory
