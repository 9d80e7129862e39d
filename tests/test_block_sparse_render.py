"""Plan rendering: the colour index grid, the PNG's pixels at known cells, the mask specs
of the command line, and the command itself."""

import subprocess
import sys

import numpy as np
import pytest
from matplotlib import colors
from matplotlib import image as mpimg

from pallas_kernels.block_sparse_attention import masks, patterns, plan_from_mask
from pallas_kernels.block_sparse_attention.masks import EMPTY, FULL, PARTIAL
from pallas_kernels.block_sparse_attention.render import (DPI, FIGURE_INCHES, KIND_COLOURS, cell_pixel, kind_grid,
                                                          plan_from_spec, render_plan)


def window_plan():
  # 8 blocks of 16; a window of 32 tokens: the diagonal block, one full block, one cut by the window's edge.
  return plan_from_mask(masks.causal_window(32), q_len=128, block_q=16, block_kv=16)


def test_kind_grid_of_a_window():
  grid = kind_grid(window_plan())
  assert grid.shape == (8, 8)
  assert grid[5, 5] == PARTIAL  # diagonal: causal inside the block
  assert grid[5, 4] == FULL  # every query of block 5 sees all of block 4
  assert grid[5, 3] == PARTIAL  # the window's lower edge cuts this block
  assert grid[5, 2] == EMPTY  # out of the window
  assert grid[5, 6] == EMPTY  # future
  assert grid[0, 0] == PARTIAL


def test_png_pixels_match_the_kinds(tmp_path):
  plan = plan_from_mask(masks.causal_window(48), q_len=128, block_q=16, block_kv=16)
  grid = kind_grid(plan)
  assert grid[6, 4] == FULL  # 48-token window: diagonal partial, one full block behind it
  path = tmp_path / 'plan.png'
  render_plan(plan, path, title='window')
  pixels = mpimg.imread(path)
  assert pixels.shape[:2] == (round(FIGURE_INCHES[1] * DPI), round(FIGURE_INCHES[0] * DPI))
  for row in range(8):
    for col in range(8):
      y, x = cell_pixel(row, col, grid.shape, pixels.shape)
      expected = colors.to_rgb(KIND_COLOURS[int(grid[row, col])])
      np.testing.assert_allclose(pixels[y, x, :3], expected, atol=2 / 255, err_msg=f'cell {row}, {col}')


def test_specs_give_the_expected_densities():
  causal = plan_from_spec('causal', 1024, 128)
  assert int(causal.kv_count.sum()) == 8 * 9 // 2
  window = plan_from_spec('causal_window:256', 1024, 128)
  np.testing.assert_array_equal(np.asarray(window.kv_count[0, 0]), [1, 2, 3, 3, 3, 3, 3, 3])
  chunked = plan_from_spec('chunked:256', 1024, 128)
  np.testing.assert_array_equal(np.asarray(chunked.kv_count[0, 0]), [1, 2] * 4)
  random = kind_grid(plan_from_spec('random:0.5', 2048, 128, seed=3))
  assert (np.diag(random) == PARTIAL).all()
  assert (random[np.triu_indices(16, 1)] == EMPTY).all()
  below = random[np.tril_indices(16, -1)]
  assert set(np.unique(below)) == {EMPTY, FULL} and 0.3 < (below == FULL).mean() < 0.7
  again = kind_grid(plan_from_spec('random:0.5', 2048, 128, seed=3))
  np.testing.assert_array_equal(random, again)
  per_head = plan_from_spec('random:0.5', 2048, 128, seed=3, heads=2)
  assert per_head.plan_heads == 2
  assert (kind_grid(per_head, plan_head=0) != kind_grid(per_head, plan_head=1)).any()
  topk = plan_from_spec('topk:3', 1024, 128)
  assert int(topk.kv_count[0, 0].max()) == 3
  with pytest.raises(ValueError, match='unknown mask spec'):
    plan_from_spec('diagonal', 1024, 128)
  with pytest.raises(ValueError, match=r'neighborhood3d:3/8: give 2 inner grid size\(s\), RxC'):
    plan_from_spec('neighborhood3d:3/8', 1024, 128)


def test_command_line(tmp_path):
  path = tmp_path / 'out.png'
  result = subprocess.run([sys.executable, '-m', 'pallas_kernels.block_sparse_attention.render', '--mask',
                           'causal_window:256', '--length', '1024', '--block', '128', '--out', str(path)],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert '8 x 8 blocks' in result.stdout
  assert mpimg.imread(path).shape[2] in (3, 4)


@pytest.mark.parametrize('spec, mask', [
    ('power:8', lambda: patterns.Power(local=8)), ('fixed:32', lambda: patterns.Fixed(32, 8)),
    ('radial:16', lambda: patterns.Radial(16)), ('neighborhood:24', lambda: patterns.Neighborhood(1 << 30, 24, causal=True)),
])
def test_pattern_specs_are_the_causal_patterns(spec, mask):
  got = plan_from_spec(spec, 256, block=16)
  want = plan_from_mask(mask() & masks.Causal(), q_len=256, block_q=16, block_kv=16)
  np.testing.assert_array_equal(np.asarray(got.block_kinds()), np.asarray(want.block_kinds()))
