// gemm.cuh: every matrix product of the model, through cuBLASLt, and the Linear layer built on it.
//
// The project stores matrices row-major; cuBLASLt reads them column-major. A row-major C[M,N] is a column-major
// C^T[N,M], so C = op(A) op(B) is computed as C^T = op(B)^T op(A)^T with the operands swapped. For the Linear
// forward y = x W^T (x [tokens, in], W [out, in]) that is cuBLASLt's "TN" case, the one FP8 GEMMs require.
#pragma once

#include <map>
#include <tuple>

#include "common.cuh"

struct MatmulKey {
    int M, N, K;
    bool trans_a, trans_b;
    cudaDataType_t ab_type, c_type;
    int batch;
    long stride_a, stride_b, stride_c;
    int lda, ldb, ldc;
    uint32_t align_a, align_b, align_c;  // byte alignment of the pointers: some algorithms need 256
    // FP8 only: how the scales of A and B are laid out (cublasLtMatmulMatrixScale_t; -1: no scales), and whether
    // the tensor cores may skip the promotion of partial sums (cuBLASLt's fast accumulation).
    int scale_mode_a = -1, scale_mode_b = -1;
    bool fast_accum = false;
    auto tie() const {
        return std::tie(M, N, K, trans_a, trans_b, ab_type, c_type, batch, stride_a, stride_b, stride_c, lda, ldb, ldc,
                        align_a, align_b, align_c, scale_mode_a, scale_mode_b, fast_accum);
    }
    bool operator<(const MatmulKey& o) const { return tie() < o.tie(); }
};

struct MatmulPlan {
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
};

// The cuBLASLt handle, its workspace, and one plan per distinct GEMM shape (the heuristic query is far slower
// than the GEMMs of a small model, so it runs once per shape).
struct Blas {
    cublasLtHandle_t handle;
    DeviceBuffer<uint8_t> workspace{size_t(32) << 20};
    std::map<MatmulKey, MatmulPlan> plans;

    Blas() { CUBLAS_CHECK(cublasLtCreate(&handle)); }
    ~Blas() {
        for (auto& kv : plans) {
            cublasLtMatmulDescDestroy(kv.second.desc);
            cublasLtMatrixLayoutDestroy(kv.second.a);
            cublasLtMatrixLayoutDestroy(kv.second.b);
            cublasLtMatrixLayoutDestroy(kv.second.c);
        }
        cublasLtDestroy(handle);
    }
    Blas(const Blas&) = delete;
    Blas& operator=(const Blas&) = delete;

    // scale_a and scale_b: for an FP8 key, scale tensors of that layout (the algorithm query wants them set).
    const MatmulPlan& plan(const MatmulKey& k, const void* scale_a = nullptr, const void* scale_b = nullptr);
};

inline cublasLtMatrixLayout_t make_layout(cudaDataType_t type, int rows, int cols, int ld, int batch, long stride) {
    cublasLtMatrixLayout_t layout;
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, rows, cols, ld));
    if (batch > 1) {
        int64_t stride64 = stride;
        CUBLAS_CHECK(
            cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
        CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride64,
                                                      sizeof(stride64)));
    }
    return layout;
}

inline const MatmulPlan& Blas::plan(const MatmulKey& k, const void* scale_a, const void* scale_b) {
    auto found = plans.find(k);
    if (found != plans.end()) return found->second;

    MatmulPlan p;
    // FP32 accumulation for every input type; no TF32, so the fp32 precision mode is exact enough for gradient checks.
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t op_b = k.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, op_a = k.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    // Column-major view: the first operand is our B, the second our A.
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_b, sizeof(op_b)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_a, sizeof(op_a)));
    p.a = make_layout(k.ab_type, k.trans_b ? k.K : k.N, k.trans_b ? k.N : k.K, k.ldb, k.batch, k.stride_b);
    p.b = make_layout(k.ab_type, k.trans_a ? k.M : k.K, k.trans_a ? k.K : k.M, k.lda, k.batch, k.stride_a);
    p.c = make_layout(k.c_type, k.N, k.M, k.ldc, k.batch, k.stride_c);
    if (k.scale_mode_a >= 0) {  // swapped too: cuBLASLt's A is our B
        int32_t mode_a = k.scale_mode_b, mode_b = k.scale_mode_a;
        int8_t fast = k.fast_accum;
        CUBLAS_CHECK(
            cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode_a, sizeof(mode_a)));
        CUBLAS_CHECK(
            cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode_b, sizeof(mode_b)));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast)));
        CUBLAS_CHECK(
            cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &scale_b, sizeof(scale_b)));
        CUBLAS_CHECK(
            cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &scale_a, sizeof(scale_a)));
    }

    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    size_t ws = workspace.bytes();
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    // Our A and B are cuBLASLt's B and A.
    const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> alignments[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, k.align_b},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, k.align_a},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, k.align_c},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, k.align_c}};
    for (const auto& [attribute, bytes] : alignments)
        CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attribute, &bytes, sizeof(bytes)));
    cublasLtMatmulHeuristicResult_t result;
    int found_count = 0;
    cublasStatus_t status =
        cublasLtMatmulAlgoGetHeuristic(handle, p.desc, p.a, p.b, p.c, p.c, pref, 1, &result, &found_count);
    cublasLtMatmulPreferenceDestroy(pref);
    if (status != CUBLAS_STATUS_NOT_SUPPORTED) CUBLAS_CHECK(status);  // not supported: no algorithm, said below
    if (found_count == 0) {
        throw std::runtime_error("cuBLASLt has no algorithm for M=" + std::to_string(k.M) +
                                 " N=" + std::to_string(k.N) + " K=" + std::to_string(k.K) +
                                 " batch=" + std::to_string(k.batch) + " (scale modes " +
                                 std::to_string(k.scale_mode_a) + ", " + std::to_string(k.scale_mode_b) + ")");
    }
    p.algo = result.algo;
    return plans.emplace(k, p).first->second;
}

// C[M,N] = alpha op(A) op(B) + beta C, all row-major. op(A) is [M,K]: A is stored [M,K], or [K,M] if trans_a.
// op(B) is [K,N]: B is stored [K,N], or [N,K] if trans_b. With batch > 1, matrices follow each other at the
// given element strides. Leading dimensions default to the dense ones.
struct Matmul {
    int M, N, K;
    bool trans_a = false, trans_b = false;
    float alpha = 1.0f, beta = 0.0f;
    int batch = 1;
    long stride_a = 0, stride_b = 0, stride_c = 0;
    int lda = 0, ldb = 0, ldc = 0;
};

template <typename TAB, typename TC>
void matmul(Blas& blas, cudaStream_t stream, TC* C, const TAB* A, const TAB* B, const Matmul& m) {
    MatmulKey key{m.M,
                  m.N,
                  m.K,
                  m.trans_a,
                  m.trans_b,
                  cuda_dtype<TAB>(),
                  cuda_dtype<TC>(),
                  m.batch,
                  m.stride_a,
                  m.stride_b,
                  m.stride_c,
                  m.lda ? m.lda : (m.trans_a ? m.M : m.K),
                  m.ldb ? m.ldb : (m.trans_b ? m.K : m.N),
                  m.ldc ? m.ldc : m.N,
                  pointer_alignment(A),
                  pointer_alignment(B),
                  pointer_alignment(C)};
    const MatmulPlan& p = blas.plan(key);
    CUBLAS_CHECK(cublasLtMatmul(blas.handle, p.desc, &m.alpha, B, p.a, A, p.b, &m.beta, C, p.c, C, p.c, &p.algo,
                                blas.workspace.data(), blas.workspace.bytes(), stream));
}

// ---------------------------------------------------------------------------------------------------------------
// Linear: y = x W^T, the three GEMMs of every projection in the model. FP8 (V3 §3.3) replaces these three calls.
// x [M, K] (M tokens), W [N, K] (PyTorch's [out, in]), y [M, N].
// ---------------------------------------------------------------------------------------------------------------

// y = x W^T (+ y if accumulate: a residual add folded into the GEMM's epilogue).
template <typename T>
void linear_forward(Blas& blas, cudaStream_t s, T* y, const T* x, const T* W, int M, int N, int K,
                    bool accumulate = false) {
    matmul(blas, s, y, x, W, Matmul{M, N, K, false, true, 1.0f, accumulate ? 1.0f : 0.0f});
}

// dx = dy W (+ dx if accumulate_dx: x fed several layers), dW = dy^T x (+ dW if accumulate_dw), dW in FP32.
template <typename T>
void linear_backward(Blas& blas, cudaStream_t s, T* dx, float* dW, const T* dy, const T* x, const T* W, int M, int N,
                     int K, bool accumulate_dx = false, bool accumulate_dw = false) {
    matmul(blas, s, dx, dy, W, Matmul{M, K, N, false, false, 1.0f, accumulate_dx ? 1.0f : 0.0f});
    matmul(blas, s, dW, dy, x, Matmul{N, K, M, true, false, 1.0f, accumulate_dw ? 1.0f : 0.0f});
}
