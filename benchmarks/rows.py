"""What the mechanism benchmarks share: timing one row, the text table, the JSON file."""

import dataclasses
import json
import time

import jax
import numpy as np


def measure_jax(fn, args, iterations):
  """(ms per call, first result). CUPTI kernel time if available, else back-to-back wall time."""
  result = jax.block_until_ready(fn(*args))  # compiles; a failure here is the function's, not the timer's
  try:
    from jax.experimental.mosaic.gpu import profiler
    result, timings = profiler.measure(fn, iterations=iterations)(*args)
    if timings:
      per_call = timings if isinstance(timings, list) else [timings]
      return float(np.median(per_call)), result
  except (ImportError, RuntimeError) as error:
    if jax.default_backend() == 'gpu':
      print(f'  CUPTI timing unavailable ({str(error)[:200]}); wall time instead', flush=True)
  start = time.perf_counter()
  results = [fn(*args) for _ in range(iterations)]
  jax.block_until_ready(results)
  return (time.perf_counter() - start) * 1e3 / iterations, result


def time_row(row, fn, fn_args, iterations):
  """Fills row.ms; returns the first result (None if the function failed)."""
  try:
    row.ms, result = measure_jax(fn, fn_args, iterations)
    return result
  except Exception as error:  # a row that cannot run is reported, the others still are
    row.note = f'{type(error).__name__}: {str(error).splitlines()[0][:160]}'
    return None


def kernel_times(call):
  """(call()'s outputs, {kernel name: total ms} of the kernels it launched, longest first),
  through CUPTI; None in place of the times where CUPTI is missing (CPU). Unlike
  `profiler.measure`, `call` runs once, so a step that donates its inputs can be profiled
  (this uses the CUPTI hooks of jax's Mosaic GPU extension that `measure` itself uses)."""
  try:
    from jax._src.lib import mosaic_gpu as mosaic_gpu_lib
    ext = mosaic_gpu_lib._mosaic_gpu_ext
    ext._cupti_init()
  except (ImportError, AttributeError, RuntimeError):
    return jax.block_until_ready(call()), None
  try:
    outputs = jax.block_until_ready(call())
  finally:
    timings = ext._cupti_get_timings(True)
  totals = {}
  for name, ms in timings or ():
    totals[name] = totals.get(name, 0.0) + ms
  return outputs, dict(sorted(totals.items(), key=lambda item: -item[1]))


def kernel_breakdown(function, fn_args, longest=None):
  """'name ms, ...' of the kernels of one call, longest first (CUPTI); '' where unavailable."""
  _, totals = kernel_times(lambda: function(*fn_args))
  items = list((totals or {}).items())[:longest]
  return ', '.join(f'{name[:60]} {ms:.3f}' for name, ms in items)


def number(value, spec):
  return '-' if not np.isfinite(value) else format(value, spec)


def text_table(columns, lines):
  """Left-aligned columns under a header and a rule; `lines` are lists of cell strings."""
  widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
  render = lambda cells: '  '.join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
  return '\n'.join([render(columns), render(['-' * w for w in widths])] + [render(line) for line in lines])


def write_json(path, meta, rows):
  """{'meta': meta, 'rows': [dataclass rows as dicts]} at `path`."""
  with open(path, 'w') as handle:
    json.dump(dict(meta=meta, rows=[dataclasses.asdict(r) for r in rows]), handle, indent=1, default=float)


def device_name():
  return f'{jax.devices()[0].device_kind} ({jax.default_backend()})'


def report(rows, table, out, meta):
  """Prints the table; with `out`, writes the rows and {device, jax, **meta} as JSON there."""
  print()
  print(table)
  if out:
    write_json(out, dict(device=device_name(), jax=jax.__version__, **meta), rows)
