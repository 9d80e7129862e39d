"""What jax 0.11.2's Mosaic GPU interpreter lacks and our kernels use, added for interpret mode.

The interpreter refuses TMA stores with a reduction (`copy_smem_to_gmem(...,
reduction_op='add')`), which the fused block-sparse backward uses to add dQ into GMEM.
`allow_tma_reduce_add()` teaches it the `add` reduction: the store task reads the
destination and writes back the sum. The interpreter runs each async copy as one host
task, so the read-modify-write is atomic, as the hardware's is. Other reductions still
raise. The real kernels on a GPU never touch this.
"""

import functools

from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks


class _ReduceAddTask(gpu_callbacks.AsyncCopySmemToGmemTask):
  """A SMEM -> GMEM copy that adds the source to the destination."""

  def __call__(self, tma_thread_id):
    memory = gpu_callbacks._get_shared_memory()
    self.pre_read(tma_thread_id, memory)
    source, _, _ = memory.get_buffer_content(self.src_allocation_key, self.src_access, self.thread,
                                             logging_info=self.logging_info)
    self.post_read(tma_thread_id, memory)
    current, _, _ = memory.get_buffer_content(self.dst_allocation_key, self.dst_access, self.thread,
                                              logging_info=self.logging_info)
    memory.store_buffer_content(self.dst_allocation_key, self.dst_access, current + source, self.thread,
                                logging_info=self.logging_info)
    self.post_write(tma_thread_id, memory)


@functools.cache
def allow_tma_reduce_add():
  plain_copy = gpu_callbacks.copy_smem_to_gmem

  def copy_smem_to_gmem(*, reduction_op, **kwargs):
    if reduction_op is None:
      return plain_copy(reduction_op=None, **kwargs)
    if str(reduction_op).lower().split('.')[-1] != 'add':
      raise NotImplementedError(f'reduction_op {reduction_op} in Mosaic GPU interpret mode')
    plain_task, gpu_callbacks.AsyncCopySmemToGmemTask = gpu_callbacks.AsyncCopySmemToGmemTask, _ReduceAddTask
    try:
      return plain_copy(reduction_op=None, **kwargs)
    finally:
      gpu_callbacks.AsyncCopySmemToGmemTask = plain_task

  gpu_callbacks.copy_smem_to_gmem = copy_smem_to_gmem
