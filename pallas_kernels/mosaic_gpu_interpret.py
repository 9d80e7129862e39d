"""What jax 0.11.2's Mosaic GPU interpreter lacks and our kernels use, added for interpret mode.

The interpreter refuses TMA stores with a reduction (`copy_smem_to_gmem(...,
reduction_op='add')`), which the fused block-sparse backward uses to add dQ into GMEM.
`allow_tma_reduce_add()` teaches it the `add` reduction: the store task reads the
destination and writes back the sum.

Interpret mode runs every warpgroup of a block on its own host thread, and a copy task runs
on the thread that issued it, so two things must hold across threads:
  - which copies add is per call: the flag travels in a thread-local set around the
    interpreter's own copy_smem_to_gmem, and is read once when the task is built (the task
    class is replaced once, for good, and never swapped back and forth);
  - the read-modify-write is atomic, as the hardware's is: one lock around every adding
    task (two warpgroups of one kv block add to the same dQ rows at once).
Other reductions still raise. The real kernels on a GPU never touch this.
"""

import functools
import threading

from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

_adding = threading.local()  # .on: the copy being issued on this thread adds
_add_lock = threading.Lock()  # held across each adding task's read and write


@functools.cache
def allow_tma_reduce_add():
  plain_task, plain_copy = gpu_callbacks.AsyncCopySmemToGmemTask, gpu_callbacks.copy_smem_to_gmem

  class SmemToGmemTask(plain_task):
    """A SMEM -> GMEM copy that, when issued under `_adding.on`, adds the source to the
    destination."""

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self.adds = getattr(_adding, 'on', False)

    def __call__(self, tma_thread_id):
      if not self.adds:
        return super().__call__(tma_thread_id)
      memory = gpu_callbacks._get_shared_memory()
      with _add_lock:
        self.pre_read(tma_thread_id, memory)
        source, _, _ = memory.get_buffer_content(self.src_allocation_key, self.src_access, self.thread,
                                                 logging_info=self.logging_info)
        self.post_read(tma_thread_id, memory)
        current, _, _ = memory.get_buffer_content(self.dst_allocation_key, self.dst_access, self.thread,
                                                  logging_info=self.logging_info)
        memory.store_buffer_content(self.dst_allocation_key, self.dst_access, current + source, self.thread,
                                    logging_info=self.logging_info)
      self.post_write(tma_thread_id, memory)

  def copy_smem_to_gmem(*, reduction_op, **kwargs):
    if reduction_op is None:
      return plain_copy(reduction_op=None, **kwargs)
    if str(reduction_op).lower().split('.')[-1] != 'add':
      raise NotImplementedError(f'reduction_op {reduction_op} in Mosaic GPU interpret mode')
    _adding.on = True
    try:
      return plain_copy(reduction_op=None, **kwargs)
    finally:
      _adding.on = False

  gpu_callbacks.AsyncCopySmemToGmemTask = SmemToGmemTask
  gpu_callbacks.copy_smem_to_gmem = copy_smem_to_gmem
