"""Gradients of the scalar-decay scan by three more forward scans (the adjoint scans).

For the scan of :func:`ramba.ops.ssd.chunk.scan_chunk` (``S_t = exp(g_t) S_{t-1} + v_t k_t^T``,
``o_t = S_t q_t``, states ``[V, K]``), with ``G_t = g_0 + ... + g_t``::

    dq_s = sum_{t<=s} e^{G_s-G_t} (do_s . v_t) k_t   + e^{G_s} S_0^T do_s           forward scan (do, v, k)
    dv_t = sum_{s>=t} e^{G_s-G_t} (q_s . k_t) do_s   + e^{G_{T-1}-G_t} dS_T k_t     reversed scan (k, q, do)
    dk_t = sum_{s>=t} e^{G_s-G_t} (do_s . v_t) q_s   + e^{G_{T-1}-G_t} dS_T^T v_t   reversed scan (v, do, q)
    dS_0 = e^{g_0} (final state of the reversed scan for dv)
    dG_t = q_t . dq_t - k_t . dk_t  (+ <dS_T, S_T> at t = T-1),   dg_t = dG_t + ... + dG_{T-1}

A reversed scan runs on the time-flipped sequence with the decays shifted by one token
(``g'_0 = 0``, ``g'_u = g_{T-u}``), so that its decay from ``s`` back to ``t`` is ``e^{G_s - G_t}``.
Any forward-only scan kernel therefore yields a differentiable scan: fla-core's simple-GLA
forward kernels are used this way on GPUs where its own backward is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ramba.ops.precision import compute_dtype

# scan(q [B,T,G,K], k [B,T,G,K], v [B,T,H,V], g [B,T,H], S_0 [B,H,V,K] | None) -> (o [B,T,H,V], S_T [B,H,V,K])
Scan = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _reversed_decays(g: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]`` -> the log-decays of the time-flipped scan: ``g'_0 = 0``, ``g'_u = g_{T-u}``."""
    return torch.cat([torch.zeros_like(g[:, :1]), g.flip(1)[:, :-1]], dim=1)


class _AdjointScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scan, q, k, v, g, initial_state):
        with torch.no_grad():
            o, final_state = scan(q, k, v, g, initial_state)
        ctx.scan = scan
        ctx.save_for_backward(q, k, v, g, initial_state, final_state)
        return o, final_state

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, g, h0, hT = ctx.saved_tensors
        scan = ctx.scan
        H, G = v.shape[2], q.shape[2]
        R = H // G
        acc = compute_dtype(v)
        d_final = d_final.to(acc)
        q_heads = q.repeat_interleave(R, dim=2).to(acc)  # [B, T, H, K]
        k_heads = k.repeat_interleave(R, dim=2).to(acc)
        g_rev = _reversed_decays(g)
        with torch.no_grad():
            dv_rev, dh0 = scan(k.flip(1), q.flip(1), do.to(v.dtype).flip(1), g_rev, d_final)
            # dg sums q.dq - k.dk over the rest of the sequence, where the terms largely cancel: dq and
            # dk come from scans in float32 (rounding them to bf16 made a model's dt_bias gradient 18% off)
            do_acc, v_acc = do.to(acc), v.to(acc)
            dq, _ = scan(do_acc, v_acc, k_heads, g, None if h0 is None else h0.transpose(-1, -2))
            dk_rev, _ = scan(v_acc.flip(1), do_acc.flip(1), q_heads.flip(1), g_rev, d_final.transpose(-1, -2))
        dk = dk_rev.flip(1)
        dG = (q_heads * dq).sum(-1) - (k_heads * dk).sum(-1)  # [B, T, H]
        dG[:, -1] += (d_final * hT.to(acc)).sum((-1, -2))
        # suffix sums: a cumsum in reversed time, with time as the last (contiguous) dim for a fast scan
        dg = dG.flip(1).transpose(1, 2).contiguous().cumsum(-1).transpose(1, 2).flip(1)
        dh0 = None if h0 is None else (dh0.to(acc) * g[:, 0, :, None, None].to(acc).exp()).to(h0.dtype)

        def per_group(d):  # [B, T, H, K] -> [B, T, G, K]: the heads of a group share q and k
            return d.unflatten(2, (G, R)).sum(3)

        return (
            None,
            per_group(dq).to(q.dtype),
            per_group(dk).to(k.dtype),
            dv_rev.flip(1).to(v.dtype),
            dg.to(g.dtype),
            dh0,
        )


def adjoint_scan(
    scan: Scan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward-only ``scan`` and make it differentiable by the adjoint scans above.

    Args:
        scan: ``scan(q, k, v, g, initial_state) -> (o, final_state)`` with the shapes below; it is
            called under ``no_grad`` (four times per forward + backward) and must accept
            ``q``/``k`` with as many groups as ``v`` has heads.
        q, k: ``[B, T, G, K]``; v: ``[B, T, H, V]`` (``H % G == 0``); g: ``[B, T, H]`` log-decays;
        initial_state: ``[B, H, V, K]`` or None.
    Returns:
        o ``[B, T, H, V]`` and the final state ``[B, H, V, K]``; differentiable in q, k, v, g and
        initial_state.
    """
    return _AdjointScan.apply(scan, q, k, v, g, initial_state)
