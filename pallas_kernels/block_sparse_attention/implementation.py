"""What an implementation of block_sparse_attention provides.

Each kernel module (reference, tpu, mosaic_gpu) exposes `IMPLEMENTATIONS`, a tuple of
these; api.py collects them. `forward` and `backward` have the reference's signatures:

    forward(q, k, v, key_bias, plan, scale) -> (out [B,Tq,H,D] q.dtype, lse [B,H,Tq] f32, natural log)
    backward(q, k, v, key_bias, plan, scale, out, lse, d_out, d_lse) -> (dq, dk, dv, d_key_bias or None)

`unavailable(q, k, v, key_bias, plan)` returns None when the implementation can run on
these inputs, else the reason (a short sentence). Interpret-mode variants (names ending
in `_interpret`) run the same kernel logic on any platform, for tests.
"""

from pallas_kernels.implementations import Implementation, always_available  # noqa: F401 (re-exported)
