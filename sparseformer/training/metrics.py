"""Where training metrics go: metrics.jsonl, TensorBoard (tensorboardX) and the terminal."""

import json
import math
import os
import sys

import jax

# Dense bf16 peak FLOP/s per chip, for the MFU estimate.
PEAK_FLOPS = {
    'h100': 989e12, 'h200': 989e12, 'h800': 989e12, 'a100': 312e12, 'l4': 121e12,
    'tpu v4': 275e12, 'tpu v5 lite': 197e12, 'tpu v5e': 197e12, 'tpu v5p': 459e12, 'tpu v6': 918e12,
}


def peak_flops_per_device():
  """Peak FLOP/s of this device kind, or None where unknown (CPUs)."""
  kind = jax.devices()[0].device_kind.lower()
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return None


def train_flops_per_token(dims, seq_len):
  """6 x matmul parameters, plus causal attention scores and values (forward + backward)."""
  d, layers = dims.d_model, dims.num_layers
  attn_proj = d * dims.head_dim * (2 * dims.num_heads + 2 * dims.num_kv_heads)
  mlp = 3 * d * dims.mlp_dim
  unembed = d * dims.vocab_size
  matmul_params = layers * (attn_proj + mlp) + unembed
  attention = layers * 6 * dims.num_heads * dims.head_dim * seq_len  # 12 * T/2 per token for causal
  return 6 * matmul_params + attention


class MetricWriter:
  """Writes one JSON object per logged step and the same scalars to TensorBoard.

  On resume, lines and events of steps after the restored step are dropped so the
  logs read as one run.
  """

  def __init__(self, workdir, resume_step=0, enabled=True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    if not enabled:
      return
    if resume_step and os.path.exists(self.path):
      self._truncate_after(resume_step)
    elif not resume_step and os.path.exists(self.path):
      os.remove(self.path)
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, 'tb'), purge_step=resume_step + 1 if resume_step else None)

  def _truncate_after(self, step):
    with open(self.path) as f:
      lines = [line for line in f if line.strip() and json.loads(line).get('step', 0) <= step]
    with open(self.path, 'w') as f:
      f.writelines(lines)

  def write(self, step, scalars, prefix=''):
    if not self.enabled:
      return
    clean = {f'{prefix}{k}': float(v) for k, v in scalars.items() if v is not None}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **clean}) + '\n')
    for name, value in clean.items():
      if math.isfinite(value):
        self.tb.add_scalar(name, value, step)

  def close(self):
    if self.tb is not None:
      self.tb.close()


class Progress:
  """A tqdm bar on a terminal; plain periodic lines otherwise (batch logs); silent when
  not enabled (processes other than 0)."""

  def __init__(self, total, start, every, enabled=True):
    self.every = every
    self.enabled = enabled
    self.bar = None
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)

  def update(self, step, line_fields):
    text = ' '.join(f'{k}={v}' for k, v in line_fields.items())
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix_str(text, refresh=False)
    elif self.enabled and step % self.every == 0:
      print(f'step {step}: {text}', flush=True)

  def message(self, text):
    if self.bar is not None:
      self.bar.write(text)
    elif self.enabled:
      print(text, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()
