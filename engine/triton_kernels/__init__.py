"""Registry of the project's Triton kernels, for `make cuda-check` (AOT compile for sm_90 without
a GPU). Each entry: (module path, kernel name, signature dict, constexprs dict). Kernels are
added here as ops gain Triton implementations; the CUDA C++ kernels are checked separately.
"""

from __future__ import annotations

TRITON_KERNELS: list[tuple[str, str, dict[str, str], dict[str, object]]] = []

# engine.triton_kernels.norm_rope at Scout's shapes (D = 5120 -> BLOCK_D 8192; Dh = 128 -> 8 heads x 64 pairs),
# bf16 activations. The RoPE kernels in both of the model's variants: RoPE layers (rotate + QK-norm) and NoPE
# layers (the query temperature scale only).
_NORM_ROPE = "engine.triton_kernels.norm_rope"
_FP32_POINTERS = ("dw_partial_ptr", "cos_ptr", "sin_ptr", "q_scale_ptr")


def _norm_rope_signature(arg_names: str, constexprs: dict[str, object]) -> dict[str, str]:
    """Argument types by name: pointers bf16 (float32 for statistics, cos / sin, scales), eps fp32,
    constexprs as given, every other argument (sizes, strides) i32."""

    def kind(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return "*fp32" if name in _FP32_POINTERS else "*bf16"
        return "fp32" if name == "eps" else "i32"

    return {name: kind(name) for name in arg_names.split()}


_RMS_BLOCK = {"BLOCK_D": 8192}
_ROPE_LAYER = {"HAS_ROPE": True, "QK_NORM": True, "HAS_SCALE": False, "BLOCK_H": 8, "BLOCK_R": 64}
_NOPE_LAYER = {"HAS_ROPE": False, "QK_NORM": False, "HAS_SCALE": True, "BLOCK_H": 8, "BLOCK_R": 64}
_RMS_FWD_ARGS = "x_ptr w_ptr y_ptr stride_x_row stride_y_row D eps BLOCK_D"
_RMS_BWD_ARGS = (
    "x_ptr w_ptr dy_ptr dx_ptr dw_partial_ptr stride_x_row stride_dy_row stride_dx_row T D rows_per_program eps BLOCK_D"
)
_ROPE_FWD_ARGS = (
    "q_ptr k_ptr q_out_ptr k_out_ptr cos_ptr sin_ptr q_scale_ptr S H G R stride_q_b stride_q_s stride_q_h "
    "stride_k_b stride_k_s stride_k_h stride_qo_b stride_qo_s stride_qo_h stride_ko_b stride_ko_s stride_ko_h eps "
    "HAS_ROPE QK_NORM HAS_SCALE BLOCK_H BLOCK_R"
)
_ROPE_BWD_ARGS = (
    "q_ptr k_ptr dq_out_ptr dk_out_ptr dq_ptr dk_ptr cos_ptr sin_ptr q_scale_ptr S H G R stride_q_b stride_q_s "
    "stride_q_h stride_k_b stride_k_s stride_k_h stride_gq_b stride_gq_s stride_gq_h stride_gk_b stride_gk_s "
    "stride_gk_h stride_dq_b stride_dq_s stride_dq_h stride_dk_b stride_dk_s stride_dk_h eps "
    "HAS_ROPE QK_NORM HAS_SCALE BLOCK_H BLOCK_R"
)
TRITON_KERNELS += [
    (_NORM_ROPE, "rms_norm_fwd_kernel", _norm_rope_signature(_RMS_FWD_ARGS, _RMS_BLOCK), _RMS_BLOCK),
    (_NORM_ROPE, "rms_norm_bwd_kernel", _norm_rope_signature(_RMS_BWD_ARGS, _RMS_BLOCK), _RMS_BLOCK),
]
for _layer in (_ROPE_LAYER, _NOPE_LAYER):
    TRITON_KERNELS += [
        (_NORM_ROPE, "rope_qk_norm_fwd_kernel", _norm_rope_signature(_ROPE_FWD_ARGS, _layer), _layer),
        (_NORM_ROPE, "rope_qk_norm_bwd_kernel", _norm_rope_signature(_ROPE_BWD_ARGS, _layer), _layer),
    ]
