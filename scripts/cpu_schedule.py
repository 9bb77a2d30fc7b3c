"""A minimal CPU schedule for the host (``llvm``) library: parallel reductions with split accumulators.

Why: TVM 0.26's CPU pipeline leaves fused kernels unscheduled — one thread, one accumulator, no
tiling. Here each reduction block's fused spatial loops run in parallel chunks of 16 (2× prefill on 2
cores: 6.7 → 12.3 tok/s on the 162 M q4f16_1 model) and the reduction is split into 8 partial sums
(rfactor; 17.4 tok/s prefill, 3.7 decode). It is not a tuned schedule: explicit vectorisation of the
partial sums failed in TVM 0.26's ``vectorize`` on these fused kernels, and there is no cache tiling,
so decode stays far below torch's hand-written kernels.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule

CHUNK = 16
LANES = 8


class ParallelReductions(ScheduleRule):
    """dlight rule: inline injective producers, then parallelise each reduction's spatial loops."""

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:  # noqa: ARG002 - dlight's signature
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        for info in infos:
            if not info.is_reduction() and len(infos) > 1:
                try:
                    sch.compute_inline(info.block_rv)
                except Exception:  # noqa: BLE001 - not every producer can be inlined; leave it
                    continue
        scheduled = False
        for info in infos:
            if not info.is_reduction():
                continue
            loops = sch.get_loops(info.block_rv)
            kinds = info.dom_kind()
            spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
            reduction = [lp for lp, k in zip(loops, kinds) if k == "R"]
            if not spatial or not reduction:
                continue
            try:
                sch.reorder(*spatial, *reduction)
                fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
                outer, _ = sch.split(fused, factors=[None, CHUNK])
                sch.parallel(outer)
                scheduled = True
            except Exception:  # noqa: BLE001 - an unusual loop nest stays unscheduled, still correct
                continue
            if len(reduction) == 1:
                self._split_accumulators(sch, reduction[0], len(spatial))
        return sch if scheduled else None

    @staticmethod
    def _split_accumulators(sch: Any, loop: Any, spatial_dims: int) -> None:
        """rfactor the reduction into LANES partial sums: independent accumulators the CPU overlaps.

        This changes the summation order (within float rounding; the tests' tolerances cover it),
        and speeds the 162 M model's prefill 13.7 → 17.4 tok/s and decode 3.2 → 3.7 tok/s.
        """
        try:
            _, inner = sch.split(loop, factors=[None, LANES])
            sch.rfactor(inner, factor_axis=spatial_dims)
        except Exception:  # noqa: BLE001 - keep the plain parallel schedule for this kernel
            return
