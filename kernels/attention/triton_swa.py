"""Triton sliding-window attention, forward and backward (FlashAttention-2 style, no T x T).

One kernel family serves both uses, because both are "queries at positions q_offset..q_offset+Tq-1
over keys at positions 0..Tk-1, key j visible to query t iff t - window < j <= t and
j >= first_valid_key":
- the prefix: Tq = Tk = T, q_offset = 0, first_valid_key = 0;
- a suffix chunk: b queries over a [cache + chunk] buffer of W + b keys, q_offset = W.

Every query block only visits the key blocks inside its window (and every key block only the
query blocks that see it), so work and memory are O(T * window). The forward also returns the
row log-sum-exp (natural log, float32) that the backward passes use to recompute probabilities.
`attention_double_backward` differentiates the backward once more (formulas in chunk.py) in three
passes; chunk.py registers all three as ops.

Launches are built as `Launch` plans with `launch_settings` (tile sizes, warps, stages per kernel
kind and dtype, chosen with pipelines/bench/check_kernels_aot.py, which compiles every plan for
sm_90 / sm_100 here). Under TRITON_INTERPRET=1 (CPU tests) the blocks are small and tiles upcast to
float32 after loading, unless TTTE2E_TRITON_BLOCKS=gpu: then the GPU's blocks and fp16 / fp32
tiles run as they would on a GPU (bf16 tiles stay upcast: the interpreter's bf16 is wrong). On GPU,
bf16/fp16 tiles go to tensor cores as they are (float32 accumulation).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the `triton` extra is optional; the public ops fall back to PyTorch
    triton = None

AVAILABLE = triton is not None
# what a kernel raises when it does not compile or fit (OutOfResources, CompilationError, ...)
TRITON_ERRORS = (triton.errors.TritonError,) if AVAILABLE else ()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCKS_ENV = "TTTE2E_TRITON_BLOCKS"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def usable(t: torch.Tensor) -> bool:
    """Whether the kernels can run on this tensor here (GPU, or the CPU under the interpreter)."""
    return (
        AVAILABLE
        and t.dtype in SUPPORTED_DTYPES
        and (t.is_cuda or (INTERPRET and t.device.type == "cpu"))
    )


if AVAILABLE:
    LOG2E = 1.4426950408889634

    @triton.jit
    def _window_bounds_for_queries(
        m_start, BLOCK_M: tl.constexpr, TK, Q_OFFSET, WINDOW, FIRST_VALID
    ):
        # keys seen by queries m_start..m_start+BLOCK_M-1 (positions Q_OFFSET + m)
        lo = tl.maximum(Q_OFFSET + m_start - WINDOW + 1, FIRST_VALID)
        lo = tl.maximum(lo, 0)
        hi = tl.minimum(Q_OFFSET + m_start + BLOCK_M, TK)
        return lo, hi

    @triton.jit
    def _visible(q_pos, k_pos, TQ_POS_END, TK, WINDOW, FIRST_VALID):
        diff = q_pos[:, None] - k_pos[None, :]
        ok = (diff >= 0) & (diff < WINDOW) & (k_pos[None, :] >= FIRST_VALID) & (k_pos[None, :] < TK)
        return ok & (q_pos[:, None] < TQ_POS_END)

    @triton.jit
    def _fwd_kernel(
        Q,
        K,
        V,
        O,  # noqa: E741 - the output pointer beside Q, K, V
        LSE,
        s_qb,
        s_qh,
        s_qm,
        s_qd,
        s_kb,
        s_kh,
        s_kn,
        s_kd,
        s_vb,
        s_vh,
        s_vn,
        s_vd,
        s_ob,
        s_oh,
        s_om,
        s_od,
        H,
        TQ,
        TK,
        Q_OFFSET,
        WINDOW,
        FIRST_VALID,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)  # element offsets exceed int32 at long T x batch
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd
        q = tl.load(q_ptrs, mask=(offs_m < TQ)[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        q_pos = Q_OFFSET + offs_m
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        lo, hi = _window_bounds_for_queries(
            pid_m * BLOCK_M, BLOCK_M, TK, Q_OFFSET, WINDOW, FIRST_VALID
        )
        k_base = K + b * s_kb + h * s_kh
        v_base = V + b * s_vb + h * s_vh
        for start_n in range(lo, hi, BLOCK_N):
            k_pos = start_n + offs_n
            kv_mask = (k_pos < TK)[:, None] & d_ok[None, :]
            k = tl.load(
                k_base + k_pos[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0
            )
            v = tl.load(
                v_base + k_pos[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # base-2 logits
            s = tl.where(
                _visible(q_pos, k_pos, Q_OFFSET + TQ, TK, WINDOW, FIRST_VALID), s, float("-inf")
            )
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m < TQ)[:, None] & d_ok[None, :])
        lse = (m_i + tl.log2(l_safe)) / 1.4426950408889634  # natural log
        tl.store(LSE + pid_bh * TQ + offs_m, lse, mask=offs_m < TQ)

    @triton.jit
    def _bwd_dkdv_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DK,
        DV,
        s_qb,
        s_qh,
        s_qm,
        s_qd,
        s_kb,
        s_kh,
        s_kn,
        s_kd,
        s_vb,
        s_vh,
        s_vn,
        s_vd,
        s_db,
        s_dh,
        s_dm,
        s_dd,
        H,
        TQ,
        TK,
        Q_OFFSET,
        WINDOW,
        FIRST_VALID,
        sm_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)  # element offsets exceed int32 at long T x batch
        h = (pid_bh % H).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        kv_mask = (offs_n < TK)[:, None] & d_ok[None, :]
        k = tl.load(
            K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
            mask=kv_mask,
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # queries that see key j: positions j..j+WINDOW-1, i.e. indices minus Q_OFFSET
        n_start = pid_n * BLOCK_N
        lo = tl.maximum(n_start - Q_OFFSET, 0)
        hi = tl.minimum(n_start + BLOCK_N - 1 + WINDOW - Q_OFFSET, TQ)
        q_base = Q + b * s_qb + h * s_qh
        do_base = DO + b * s_db + h * s_dh
        for start_m in range(lo, hi, BLOCK_M):
            m = start_m + offs_m
            q_mask = (m < TQ)[:, None] & d_ok[None, :]
            q = tl.load(q_base + m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
            do = tl.load(
                do_base + m[:, None] * s_dm + offs_d[None, :] * s_dd, mask=q_mask, other=0.0
            )
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + pid_bh * TQ + m, mask=m < TQ, other=0.0)
            delta = tl.load(DELTA + pid_bh * TQ + m, mask=m < TQ, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
            p = tl.exp(s - lse[:, None])
            p = tl.where(
                _visible(Q_OFFSET + m, offs_n, Q_OFFSET + TQ, TK, WINDOW, FIRST_VALID), p, 0.0
            )
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        dk = dk * sm_scale
        tl.store(
            DK + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
            dk.to(DK.dtype.element_ty),
            mask=kv_mask,
        )
        tl.store(
            DV + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
            dv.to(DV.dtype.element_ty),
            mask=kv_mask,
        )

    @triton.jit
    def _bwd_dq_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DQ,
        s_qb,
        s_qh,
        s_qm,
        s_qd,
        s_kb,
        s_kh,
        s_kn,
        s_kd,
        s_vb,
        s_vh,
        s_vn,
        s_vd,
        s_db,
        s_dh,
        s_dm,
        s_dd,
        H,
        TQ,
        TK,
        Q_OFFSET,
        WINDOW,
        FIRST_VALID,
        sm_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)  # element offsets exceed int32 at long T x batch
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q_mask = (offs_m < TQ)[:, None] & d_ok[None, :]
        q = tl.load(
            Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
            mask=q_mask,
            other=0.0,
        )
        do = tl.load(
            DO + b * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd,
            mask=q_mask,
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + pid_bh * TQ + offs_m, mask=offs_m < TQ, other=0.0)
        delta = tl.load(DELTA + pid_bh * TQ + offs_m, mask=offs_m < TQ, other=0.0)
        q_pos = Q_OFFSET + offs_m
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        lo, hi = _window_bounds_for_queries(
            pid_m * BLOCK_M, BLOCK_M, TK, Q_OFFSET, WINDOW, FIRST_VALID
        )
        k_base = K + b * s_kb + h * s_kh
        v_base = V + b * s_vb + h * s_vh
        for start_n in range(lo, hi, BLOCK_N):
            k_pos = start_n + offs_n
            kv_mask = (k_pos < TK)[:, None] & d_ok[None, :]
            k = tl.load(
                k_base + k_pos[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0
            )
            v = tl.load(
                v_base + k_pos[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
            p = tl.exp(s - lse[:, None])
            p = tl.where(_visible(q_pos, k_pos, Q_OFFSET + TQ, TK, WINDOW, FIRST_VALID), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dq = dq * sm_scale
        tl.store(
            DQ + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
            dq.to(DQ.dtype.element_ty),
            mask=q_mask,
        )

    # --- double backward -----------------------------------------------------------------------
    # Gradients of (dQ, dK, dV) = bwd(Q, K, V, dO) given their cotangents (gQ, gK, gV); formulas in
    # chunk.py. Three passes, each recomputing its tiles (nothing [Tq, Tk] is stored):
    # row stats E = rowsum(P G), F = rowsum(P gP); then per query block grad Q and grad dO; then
    # per key block grad K and grad V. All inputs contiguous [B, H, T, dh].

    @triton.jit
    def _dd_tile(q, do, gq, k, v, gk, gv, lse, delta, visible, sm_scale, PRECISION: tl.constexpr):
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        g = (
            tl.dot(gq, tl.trans(k), input_precision=PRECISION)
            + tl.dot(q, tl.trans(gk), input_precision=PRECISION)
        ) * sm_scale
        dogv = tl.dot(do, tl.trans(gv), input_precision=PRECISION)
        return p, dp - delta[:, None], g, dogv

    @triton.jit
    def _load_rows(base, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
        t = tl.load(
            base + rows[:, None] * HEAD_DIM + offs_d[None, :],
            mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :],
            other=0.0,
        )
        if UPCAST:
            t = t.to(tl.float32)
        return t

    @triton.jit
    def _dd_rows_kernel(
        Q,
        K,
        V,
        DO,
        GQ,
        GK,
        GV,
        LSE,
        DELTA,
        E,
        F,
        GRAD_Q,
        GRAD_DO,
        TQ,
        TK,
        Q_OFFSET,
        WINDOW,
        FIRST_VALID,
        sm_scale,
        STATS_ONLY: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q_base = pid_bh.to(tl.int64) * TQ * HEAD_DIM
        k_base = pid_bh.to(tl.int64) * TK * HEAD_DIM
        q = _load_rows(Q + q_base, offs_m, TQ, offs_d, HEAD_DIM, UPCAST)
        do = _load_rows(DO + q_base, offs_m, TQ, offs_d, HEAD_DIM, UPCAST)
        gq = _load_rows(GQ + q_base, offs_m, TQ, offs_d, HEAD_DIM, UPCAST)
        row_ok = offs_m < TQ
        lse = tl.load(LSE + pid_bh * TQ + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh * TQ + offs_m, mask=row_ok, other=0.0)
        if STATS_ONLY:
            e_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
            pgp_acc = tl.zeros([BLOCK_M], dtype=tl.float32)  # rowsum(P (G (dP - D) + dO gV^T))
        else:
            e = tl.load(E + pid_bh * TQ + offs_m, mask=row_ok, other=0.0)
            f = tl.load(F + pid_bh * TQ + offs_m, mask=row_ok, other=0.0)
            grad_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            grad_do = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        q_pos = Q_OFFSET + offs_m
        lo, hi = _window_bounds_for_queries(
            pid_m * BLOCK_M, BLOCK_M, TK, Q_OFFSET, WINDOW, FIRST_VALID
        )
        for start_n in range(lo, hi, BLOCK_N):
            k_pos = start_n + offs_n
            k = _load_rows(K + k_base, k_pos, TK, offs_d, HEAD_DIM, UPCAST)
            v = _load_rows(V + k_base, k_pos, TK, offs_d, HEAD_DIM, UPCAST)
            gk = _load_rows(GK + k_base, k_pos, TK, offs_d, HEAD_DIM, UPCAST)
            gv = _load_rows(GV + k_base, k_pos, TK, offs_d, HEAD_DIM, UPCAST)
            visible = _visible(q_pos, k_pos, Q_OFFSET + TQ, TK, WINDOW, FIRST_VALID)
            p, dp_d, g, dogv = _dd_tile(
                q, do, gq, k, v, gk, gv, lse, delta, visible, sm_scale, PRECISION
            )
            if STATS_ONLY:
                e_acc += tl.sum(p * g, 1)
                pgp_acc += tl.sum(p * (g * dp_d + dogv), 1)
            else:
                g_p = g * dp_d - e[:, None] * (dp_d + delta[:, None]) + dogv
                g_s = p * (g_p - f[:, None])
                d_s = p * dp_d
                g_dp = p * (g - e[:, None])
                grad_q += tl.dot(g_s.to(k.dtype), k, input_precision=PRECISION)
                grad_q += tl.dot(d_s.to(gk.dtype), gk, input_precision=PRECISION)
                grad_do += tl.dot(g_dp.to(v.dtype), v, input_precision=PRECISION)
                grad_do += tl.dot(p.to(gv.dtype), gv, input_precision=PRECISION)
        if STATS_ONLY:
            tl.store(E + pid_bh * TQ + offs_m, e_acc, mask=row_ok)
            # F = rowsum(P gP) = rowsum(P (G (dP - D) + dO gV^T)) - E D, since rowsum(P dP) = D
            tl.store(F + pid_bh * TQ + offs_m, pgp_acc - e_acc * delta, mask=row_ok)
        else:
            out_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
            ptrs = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(GRAD_Q + ptrs, (grad_q * sm_scale).to(GRAD_Q.dtype.element_ty), mask=out_mask)
            tl.store(GRAD_DO + ptrs, grad_do.to(GRAD_DO.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _dd_cols_kernel(
        Q,
        K,
        V,
        DO,
        GQ,
        GK,
        GV,
        LSE,
        DELTA,
        E,
        F,
        GRAD_K,
        GRAD_V,
        TQ,
        TK,
        Q_OFFSET,
        WINDOW,
        FIRST_VALID,
        sm_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_base = pid_bh.to(tl.int64) * TQ * HEAD_DIM
        k_base = pid_bh.to(tl.int64) * TK * HEAD_DIM
        k = _load_rows(K + k_base, offs_n, TK, offs_d, HEAD_DIM, UPCAST)
        v = _load_rows(V + k_base, offs_n, TK, offs_d, HEAD_DIM, UPCAST)
        gk = _load_rows(GK + k_base, offs_n, TK, offs_d, HEAD_DIM, UPCAST)
        gv = _load_rows(GV + k_base, offs_n, TK, offs_d, HEAD_DIM, UPCAST)
        grad_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        grad_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        n_start = pid_n * BLOCK_N
        lo = tl.maximum(n_start - Q_OFFSET, 0)
        hi = tl.minimum(n_start + BLOCK_N - 1 + WINDOW - Q_OFFSET, TQ)
        for start_m in range(lo, hi, BLOCK_M):
            m = start_m + offs_m
            row_ok = m < TQ
            q = _load_rows(Q + q_base, m, TQ, offs_d, HEAD_DIM, UPCAST)
            do = _load_rows(DO + q_base, m, TQ, offs_d, HEAD_DIM, UPCAST)
            gq = _load_rows(GQ + q_base, m, TQ, offs_d, HEAD_DIM, UPCAST)
            lse = tl.load(LSE + pid_bh * TQ + m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + pid_bh * TQ + m, mask=row_ok, other=0.0)
            e = tl.load(E + pid_bh * TQ + m, mask=row_ok, other=0.0)
            f = tl.load(F + pid_bh * TQ + m, mask=row_ok, other=0.0)
            visible = _visible(Q_OFFSET + m, offs_n, Q_OFFSET + TQ, TK, WINDOW, FIRST_VALID)
            p, dp_d, g, dogv = _dd_tile(
                q, do, gq, k, v, gk, gv, lse, delta, visible, sm_scale, PRECISION
            )
            g_p = g * dp_d - e[:, None] * (dp_d + delta[:, None]) + dogv
            g_s = p * (g_p - f[:, None])
            d_s = p * dp_d
            g_dp = p * (g - e[:, None])
            grad_k += tl.dot(tl.trans(g_s).to(q.dtype), q, input_precision=PRECISION)
            grad_k += tl.dot(tl.trans(d_s).to(gq.dtype), gq, input_precision=PRECISION)
            grad_v += tl.dot(tl.trans(g_dp).to(do.dtype), do, input_precision=PRECISION)
        out_mask = (offs_n < TK)[:, None] & (offs_d < HEAD_DIM)[None, :]
        ptrs = k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(GRAD_K + ptrs, (grad_k * sm_scale).to(GRAD_K.dtype.element_ty), mask=out_mask)
        tl.store(GRAD_V + ptrs, grad_v.to(GRAD_V.dtype.element_ty), mask=out_mask)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, first_valid_key: int):
    if not AVAILABLE:
        raise RuntimeError(
            "Triton is not installed: install the `triton` extra or use the PyTorch path"
        )
    if (
        q.dim() != 4
        or k.shape != v.shape
        or q.shape[:2] != k.shape[:2]
        or q.shape[-1] != k.shape[-1]
    ):
        raise ValueError(
            f"expected q [B, H, Tq, dh] and k, v [B, H, Tk, dh]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-2] > k.shape[-2]:
        raise ValueError(
            f"more queries ({q.shape[-2]}) than keys ({k.shape[-2]}): queries are the "
            "last Tq key positions"
        )
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"Triton attention takes float16/bfloat16/float32 q, k, v of one dtype; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 0 <= first_valid_key <= k.shape[-2] - q.shape[-2]:
        raise ValueError(
            f"first_valid_key {first_valid_key} must lie in the cache part "
            f"[0, {k.shape[-2] - q.shape[-2]}]"
        )


@dataclasses.dataclass(frozen=True)
class LaunchSettings:
    """How a kernel family is launched: tile sizes, tile dtype handling, warps and stages."""

    block_m: int
    block_n: int
    block_d: int
    precision: str  # tl.dot input precision for float32 tiles ("ieee": exact)
    upcast: bool  # tiles to float32 after loading (the interpreter's bf16 is wrong)
    num_warps: int | None = None  # None: triton's default (4)
    num_stages: int | None = None  # None: triton's default (3 on NVIDIA)

    def launch_options(self) -> dict:
        return {
            key: value
            for key, value in (("num_warps", self.num_warps), ("num_stages", self.num_stages))
            if value is not None
        }


def gpu_blocks_under_interpreter() -> bool:
    """TTTE2E_TRITON_BLOCKS=gpu: the interpreter runs the GPU's tile sizes and tile dtypes (tests
    of the multi-tile and fp16 paths a GPU takes); read per launch, so tests can switch it."""
    value = os.environ.get(BLOCKS_ENV, "auto")
    if value not in ("auto", "gpu"):
        raise ValueError(f"{BLOCKS_ENV}={value!r}: choose auto or gpu")
    return value == "gpu"


def launch_settings(kind: str, head_dim: int, dtype: torch.dtype, gpu: bool | None = None):
    """The settings for kind 'fwd' (forward), 'bwd' (backward) or 'dd' (double backward).

    gpu=None: what this process runs (the GPU's settings unless under the interpreter, where
    small blocks keep the tests fast, or TTTE2E_TRITON_BLOCKS=gpu). check_kernels_aot.py compiles
    gpu=True for H100 / B200 and checks shared memory, registers and spills against the limits.
    """
    if kind not in ("fwd", "bwd", "dd"):
        raise ValueError(f"unknown kernel kind {kind!r}")
    if gpu is None:
        gpu = not INTERPRET or gpu_blocks_under_interpreter()
    # 80 and 96 pad to 128 (tl.arange needs a power of two); masked columns cost no loads
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays exact; ignored for bf16
    # The interpreter's bf16 is wrong: upcast there; fp16 and fp32 tiles run as a GPU runs them
    upcast = INTERPRET and (dtype == torch.bfloat16 or not gpu)
    if not gpu:
        block = 16 if kind == "dd" else 32
        return LaunchSettings(block, block, block_d, precision, upcast)
    # Chosen with check_kernels_aot.py (ptxas's report for sm_90 / sm_100): no shared-memory
    # overflow and no heavy spills. float32 tiles take no tensor cores (precision "ieee": FMA
    # loops) and twice the registers, so they get small tiles and more warps.
    wide = block_d > 64
    if kind == "dd":  # seven operand tiles per step and five [block, block] temporaries
        if dtype == torch.float32:
            return LaunchSettings(16, 16, block_d, precision, upcast, num_warps=8, num_stages=1)
        return LaunchSettings(
            32, 32, block_d, precision, upcast, num_warps=8 if wide else 4, num_stages=2
        )
    if dtype == torch.float32:
        if kind == "fwd":
            warps, stages = (16, 2) if wide else (8, 2)
        else:
            warps, stages = (8, 1) if wide else (8, 2)
        return LaunchSettings(32, 32, block_d, precision, upcast, warps, stages)
    block = 32 if block_d > 128 else 64
    return LaunchSettings(
        block,
        block,
        block_d,
        precision,
        upcast,
        num_warps=8 if wide else 4,
        num_stages=2 if wide else 3,
    )


@dataclasses.dataclass
class Launch:
    """One kernel launch: what `run` launches and check_kernels_aot.py compiles ahead of time."""

    name: str
    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    settings: LaunchSettings

    def run(self):
        self.kernel[self.grid](*self.args, **self.constexprs, **self.settings.launch_options())


def _tile_constexprs(head_dim: int, settings: LaunchSettings) -> dict:
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_M=settings.block_m,
        BLOCK_N=settings.block_n,
        BLOCK_D=settings.block_d,
        UPCAST=settings.upcast,
        PRECISION=settings.precision,
    )


def forward_launches(q, k, v, window: int, first_valid_key: int = 0, gpu: bool | None = None):
    """(out, lse, launches) of attention_forward; the launches fill out and lse."""
    _check(q, k, v, window, first_valid_key)
    batch, heads, tq, head_dim = q.shape
    tk = k.shape[-2]
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, tq, device=q.device, dtype=torch.float32)
    settings = launch_settings("fwd", head_dim, q.dtype, gpu)
    args = (
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, tq, tk, tk - tq, window, first_valid_key, LOG2E / math.sqrt(head_dim),
    )  # fmt: skip
    grid = (triton.cdiv(tq, settings.block_m), batch * heads)
    launch = Launch(
        "forward", _fwd_kernel, grid, args, _tile_constexprs(head_dim, settings), settings
    )
    return out, lse, [launch]


def attention_forward(q, k, v, window: int, first_valid_key: int = 0):
    """Windowed attention of the last Tq positions of Tk; returns (out [B,H,Tq,dh], lse [B,H,Tq])."""
    out, lse, launches = forward_launches(q, k, v, window, first_valid_key)
    for launch in launches:
        launch.run()
    return out, lse


def backward_launches(
    q, k, v, out, lse, grad_out, window: int, first_valid_key: int = 0, gpu: bool | None = None
):
    """((dq, dk, dv), launches) of attention_backward."""
    _check(q, k, v, window, first_valid_key)
    batch, heads, tq, head_dim = q.shape
    tk = k.shape[-2]
    # the kernels multiply grad_out tiles with q/k/v tiles: one dtype (autocast may hand fp32)
    grad_out = grad_out.to(q.dtype).contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # rowsum(dO * O) = rowsum(P * dP)
    lse = lse.contiguous()
    # dq uses q's strides and dk/dv k's/v's: allocate them contiguous and hand q/k/v contiguous too
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    settings = launch_settings("bwd", head_dim, q.dtype, gpu)
    constexprs = _tile_constexprs(head_dim, settings)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    scalars = (heads, tq, tk, tk - tq, window, first_valid_key, 1.0 / math.sqrt(head_dim))
    launches = [
        Launch(
            "backward dk dv",
            _bwd_dkdv_kernel,
            (triton.cdiv(tk, settings.block_n), batch * heads),
            (q, k, v, grad_out, lse, delta, dk, dv, *strides, *scalars),
            constexprs,
            settings,
        ),
        Launch(
            "backward dq",
            _bwd_dq_kernel,
            (triton.cdiv(tq, settings.block_m), batch * heads),
            (q, k, v, grad_out, lse, delta, dq, *strides, *scalars),
            constexprs,
            settings,
        ),
    ]
    return (dq, dk, dv), launches


def attention_backward(q, k, v, out, lse, grad_out, window: int, first_valid_key: int = 0):
    """First-order gradients (dq, dk, dv) of attention_forward, recomputing probabilities from lse."""
    grads, launches = backward_launches(q, k, v, out, lse, grad_out, window, first_valid_key)
    for launch in launches:
        launch.run()
    return grads


def double_backward_launches(
    q, k, v, out, lse, grad_out, g_dq, g_dk, g_dv, window: int, first_valid_key: int = 0,
    gpu: bool | None = None,
):  # fmt: skip
    """((grad_q, grad_k, grad_v, grad_grad_out), launches) of attention_double_backward."""
    _check(q, k, v, window, first_valid_key)
    batch, heads, tq, head_dim = q.shape
    tk = k.shape[-2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out = grad_out.to(q.dtype).contiguous()
    gq = torch.zeros_like(q) if g_dq is None else g_dq.to(q.dtype).contiguous()
    gk = torch.zeros_like(k) if g_dk is None else g_dk.to(k.dtype).contiguous()
    gv = torch.zeros_like(v) if g_dv is None else g_dv.to(v.dtype).contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    lse = lse.float().contiguous()
    e = torch.empty(batch, heads, tq, device=q.device, dtype=torch.float32)
    f = torch.empty_like(e)
    grad_q, grad_do = torch.empty_like(q), torch.empty_like(grad_out)
    grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
    settings = launch_settings("dd", head_dim, q.dtype, gpu)
    constexprs = _tile_constexprs(head_dim, settings)
    scalars = (tq, tk, tk - tq, window, first_valid_key, 1.0 / math.sqrt(head_dim))
    tensors = (q, k, v, grad_out, gq, gk, gv, lse, delta, e, f)
    rows = (triton.cdiv(tq, settings.block_m), batch * heads)
    launches = [
        Launch(
            f"double backward {name}",
            _dd_rows_kernel,
            rows,
            (*tensors, grad_q, grad_do, *scalars),
            {"STATS_ONLY": stats_only, **constexprs},
            settings,
        )
        for name, stats_only in (("row stats", True), ("dq ddo", False))
    ]
    launches.append(
        Launch(
            "double backward dk dv",
            _dd_cols_kernel,
            (triton.cdiv(tk, settings.block_n), batch * heads),
            (*tensors, grad_k, grad_v, *scalars),
            constexprs,
            settings,
        )
    )
    return (grad_q, grad_k, grad_v, grad_do), launches


def attention_double_backward(
    q, k, v, out, lse, grad_out, g_dq, g_dk, g_dv, window: int, first_valid_key: int = 0
):
    """Gradients of attention_backward's (dq, dk, dv) w.r.t. (q, k, v, grad_out), given their
    cotangents (None = zero); returns (grad_q, grad_k, grad_v, grad_grad_out)."""
    grads, launches = double_backward_launches(
        q, k, v, out, lse, grad_out, g_dq, g_dk, g_dv, window, first_valid_key
    )
    for launch in launches:
        launch.run()
    return grads
