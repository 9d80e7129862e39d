"""Block-sparse flash attention: one plan (plan.py), an exact reference (reference.py) and
the public function (api.py)."""

from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.api import block_sparse_attention, deterministic_backward
from pallas_kernels.block_sparse_attention.plan import (BlockSparsePlan, density, plan_from_block_mask,
                                                        plan_from_block_scores, plan_from_mask)

__all__ = ['BlockSparsePlan', 'block_sparse_attention', 'density', 'deterministic_backward', 'masks',
           'plan_from_block_mask', 'plan_from_block_scores', 'plan_from_mask']
