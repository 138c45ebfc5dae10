// Tests of gemm.cuh and layers.cuh: every kernel against its CPU reference (tests/reference.h), in FP32 and BF16
// storage. An output is poisoned (NaN bytes) before the launch, so an element the kernel does not write fails its
// check; a buffer that a kernel writes only in part starts from random values instead, and the part it must not
// write has to come back unchanged.
#include <algorithm>
#include <cstring>
#include <numeric>

#include "reference.h"

namespace {

using ref::stream;

// ---------------------------------------------------------------------------------------------------------------
// Matmul helpers
// ---------------------------------------------------------------------------------------------------------------

// One operand of a Matmul as stored: rows, columns, leading dimension and batch stride.
struct Stored {
    int rows, cols, ld;
    long stride;
    long at(int batch, int row, int col) const { return batch * stride + long(row) * ld + col; }
    long size(int batch) const { return at(batch - 1, rows - 1, cols - 1) + 1; }
};

// Leading dimensions default to the dense ones, as in gemm.cuh.
Stored stored_a(const Matmul& m) {
    int rows = m.trans_a ? m.K : m.M, cols = m.trans_a ? m.M : m.K;
    return {rows, cols, m.lda ? m.lda : cols, m.stride_a};
}

Stored stored_b(const Matmul& m) {
    int rows = m.trans_b ? m.N : m.K, cols = m.trans_b ? m.K : m.N;
    return {rows, cols, m.ldb ? m.ldb : cols, m.stride_b};
}

Stored stored_c(const Matmul& m) { return {m.M, m.N, m.ldc ? m.ldc : m.N, m.stride_c}; }

// A batch of 3, every leading dimension padded by 3, and 5 unused elements between consecutive matrices.
Matmul padded_batch(int M, int N, int K, bool trans_a, bool trans_b) {
    Matmul m{M, N, K, trans_a, trans_b, 0.5f, 1.0f, 3};
    Stored a = stored_a(m), b = stored_b(m), c = stored_c(m);
    m.lda = a.cols + 3, m.ldb = b.cols + 3, m.ldc = c.cols + 3;
    m.stride_a = long(a.rows) * m.lda + 5, m.stride_b = long(b.rows) * m.ldb + 5, m.stride_c = long(c.rows) * m.ldc + 5;
    return m;
}

// One Matmul on random inputs rounded to TAB. C starts random: it is added to when beta = 1, and its elements outside
// the M x N matrices (the padding of ldc, the gaps between batches) must come back unchanged.
template <typename TAB, typename TC>
void check_matmul(const Matmul& m, Rng& rng) {
    INFO("A, B in ", doctest::toString<TAB>(), ", C in ", doctest::toString<TC>(), ", trans_a ", m.trans_a,
         ", trans_b ", m.trans_b, ", batch ", m.batch);
    Stored a = stored_a(m), b = stored_b(m), c = stored_c(m);
    ref::Tensor<TAB> A = ref::input<TAB>(rng, a.size(m.batch)), B = ref::input<TAB>(rng, b.size(m.batch));
    ref::Tensor<TC> C = ref::input<TC>(rng, c.size(m.batch));
    Blas blas;
    matmul(blas, stream, C.data(), A.data(), B.data(), m);

    std::vector<float> want = C.host;
    std::vector<bool> written(want.size());
    for (int i = 0; i < m.batch; i++) {
        ref::matmul(&want[c.at(i, 0, 0)], &A.host[a.at(i, 0, 0)], &B.host[b.at(i, 0, 0)], m.M, m.N, m.K, m.trans_a,
                    m.trans_b, a.ld, b.ld, c.ld, m.alpha, m.beta);
        for (int row = 0; row < m.M; row++)
            for (int col = 0; col < m.N; col++) written[c.at(i, row, col)] = true;
    }
    std::vector<float> got = ref::download(C.device);
    CHECK_CLOSE(ref::where(got, written), ref::where(want, written), ref::tolerance<TC>());
    CHECK(ref::where(got, written, false) == ref::where(C.host, written, false));
}

// FP32, BF16, and BF16 inputs with an FP32 result. The last one gets FP32's tolerance: products of BF16 values are
// exact in FP32, so only the FP32 accumulation rounds.
void check_matmul_precisions(const Matmul& m, Rng& rng) {
    check_matmul<float, float>(m, rng);
    check_matmul<bf16, bf16>(m, rng);
    check_matmul<bf16, float>(m, rng);
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm and AdamW helpers
// ---------------------------------------------------------------------------------------------------------------

struct NormShape {
    int N, D, stride;
};

// The kernels load 16 bytes a lane where D, the stride and the pointers allow it, and fewer otherwise. Rows wider
// than a warp's 32 lanes; MLA's kv_a case, the first D columns of wider rows (8-byte loads in BF16), over more rows
// than one block of the backward kernel takes (partial_rows_per_block), so that the weight gradient adds partial
// sums; enough rows that a block's warps take more than one each; the model's width, which leaves half of the lanes a
// chunk short in BF16; kv_a's shape at 16 bytes; a stride of 22 (two values a load) and an odd D (one); rows wider
// than the registers' segment (ROW_SEGMENT columns), at 16 bytes and at one value a load.
const NormShape norm_shapes[] = {{13, 48, 48}, {130, 16, 20}, {5000, 24, 24},  {300, 384, 384}, {64, 128, 160},
                                 {40, 20, 22}, {17, 13, 13},  {6, 1280, 1288}, {9, 1100, 1101}};
constexpr double norm_eps = 1e-6;

// The moments must equal the reference's stochastically rounded values, except where host and device FP32 values
// before rounding differ in the last bit, and the random word then falls between the two (odds of 1 in 65536 each):
// at most 1% of the elements, by one BF16 step (at most 2^-7 relative). Rounding to nearest instead of stochastically
// would differ on about half of them.
void check_moments(const std::vector<float>& got, const std::vector<float>& want) {
    size_t differ = 0;
    bool within_one_step = true;
    for (size_t i = 0; i < want.size(); i++) {
        if (got[i] == want[i]) continue;
        differ++;
        within_one_step = within_one_step && std::fabs(got[i] - want[i]) <= std::ldexp(std::fabs(want[i]), -7);
    }
    CHECK(differ <= want.size() / 100);
    CHECK(within_one_step);
}

std::vector<float> zeros(size_t n) { return std::vector<float>(n, 0.0f); }

// SwiGLU over N rows of width I, every array starting offset elements into its buffer.
struct SwigluShape {
    int N, I, offset;
};

// The kernels move 16 bytes a thread where I and the pointers allow it, and fewer otherwise. A block of several rows
// (16 bytes); the routed experts' width over blocks of 16 (BF16) or 8 (FP32) rows, the last one short; an odd width
// (one value a thread); widths a multiple of 4 and of 2 only (8 and 4 bytes in BF16); rows wider than a block's
// chunks, at 16 bytes and at one value a thread; and the routed experts' width at pointers one element off (one value
// a thread).
const SwigluShape swiglu_shapes[] = {{26, 40, 0}, {300, 256, 0}, {33, 37, 0}, {21, 12, 0},
                                     {7, 6, 0},   {3, 4104, 0},  {5, 601, 0}, {40, 256, 1}};

// The elements of x from offset on.
std::vector<float> after(const std::vector<float>& x, int offset) {
    return std::vector<float>(x.begin() + offset, x.end());
}

// Finite differences through a reference with float inputs: x + h is rounded to float, so h must be large (1e-3),
// and the result is good to about 1e-4.
template <typename Loss>
std::vector<double> numerical_gradient_float(const Loss& loss, const std::vector<float>& x) {
    auto loss_double = [&](const std::vector<double>& xd) { return loss(std::vector<float>(xd.begin(), xd.end())); };
    return ref::numerical_gradient(loss_double, ref::to_double(x), 1e-3);
}

constexpr double fd_tolerance = 1e-3;

}  // namespace

TEST_SUITE("gpu") {
    TEST_CASE("matmul: all four transpose cases at odd sizes, in fp32, bf16, and bf16 to fp32") {
        Rng rng(1);
        for (bool trans_a : {false, true})
            for (bool trans_b : {false, true}) check_matmul_precisions(Matmul{37, 29, 45, trans_a, trans_b}, rng);
    }

    TEST_CASE("matmul: batched with strides, padded leading dimensions, alpha = 0.5 and beta = 1") {
        Rng rng(2);
        for (bool trans_a : {false, true})
            for (bool trans_b : {false, true}) check_matmul_precisions(padded_batch(19, 13, 21, trans_a, trans_b), rng);
    }

    TEST_CASE_TEMPLATE("linear: forward and backward, overwriting and accumulating", T, float, bf16) {
        const int M = 33, N = 24, K = 40;  // tokens, out features, in features
        Rng rng(3);
        ref::Tensor<T> x = ref::input<T>(rng, M * K), W = ref::input<T>(rng, N * K), dy = ref::input<T>(rng, M * N);
        Blas blas;
        for (bool accumulate : {false, true}) {
            CAPTURE(accumulate);
            // The reference updates each output's host values as the kernel updates its device copy.
            ref::Tensor<T> y = ref::output<T>(rng, M * N, accumulate);
            linear_forward(blas, stream, y.data(), x.data(), W.data(), M, N, K, accumulate);
            ref::linear_forward(x.host, W.host, M, N, K, y.host, accumulate);
            CHECK_CLOSE(ref::download(y.device), y.host, ref::tolerance<T>());

            ref::Tensor<T> dx = ref::output<T>(rng, M * K, accumulate);
            ref::Tensor<float> dW = ref::output<float>(rng, N * K, accumulate);
            linear_backward(blas, stream, dx.data(), dW.data(), dy.data(), x.data(), W.data(), M, N, K, accumulate,
                            accumulate);
            ref::linear_backward(dy.host, x.host, W.host, M, N, K, dx.host, dW.host, accumulate, accumulate);
            CHECK_CLOSE(ref::download(dx.device), dx.host, ref::tolerance<T>());
            // dW is FP32, summed from exact products of T values: FP32's tolerance in both precisions.
            CHECK_CLOSE(ref::download(dW.device), dW.host, ref::tolerance<float>());
        }
    }

    TEST_CASE_TEMPLATE("embedding: forward gathers rows; backward sums repeated tokens, overwriting or accumulating", T,
                       float, bf16) {
        const int V = 11, D = 40;
        Rng rng(4);
        // Tokens over the first 10 rows: repeats are certain, and the last row receives no gradient. 26 tokens
        // end within the backward scan's first ballot, 300 need three steps of its scan.
        for (int N : {26, 300}) {
            CAPTURE(N);
            std::vector<int> tokens(N);
            for (int& t : tokens) t = int(rng.range(0, V - 2));
            DeviceBuffer<int> tokens_device;
            tokens_device.upload(tokens);

            ref::Tensor<T> E = ref::input<T>(rng, V * D), x = ref::output<T>(rng, N * D, false);
            embedding_forward(x.data(), tokens_device.data(), E.data(), N, D, stream);
            CHECK(ref::download(x.device) == ref::embedding_forward(E.host, tokens, D));  // a gather is exact

            ref::Tensor<T> dx = ref::input<T>(rng, N * D);
            for (bool accumulate : {false, true}) {
                CAPTURE(accumulate);
                ref::Tensor<float> dE = ref::output<float>(rng, V * D, accumulate);
                embedding_backward(dE.data(), dx.data(), tokens_device.data(), N, V, D, accumulate, stream);
                ref::embedding_backward(dx.host, tokens, D, dE.host, accumulate);
                CHECK_CLOSE(ref::download(dE.device), dE.host, ref::tolerance<float>());
            }
        }
    }

    TEST_CASE_TEMPLATE("rmsnorm: forward on contiguous and strided rows", T, float, bf16) {
        Rng rng(5);
        for (NormShape s : norm_shapes) {
            CAPTURE(s.N);
            CAPTURE(s.stride);
            ref::Tensor<T> x = ref::input<T>(rng, size_t(s.N) * s.stride), w = ref::input<T>(rng, s.D, 0.5, 1.5);
            ref::Tensor<T> y = ref::output<T>(rng, size_t(s.N) * s.D, false);
            ref::Tensor<float> rstd = ref::output<float>(rng, s.N, false);
            rmsnorm_forward(y.data(), rstd.data(), x.data(), s.stride, w.data(), s.N, s.D, float(norm_eps), stream);
            ref::rmsnorm_forward(x.host, s.N, s.D, s.stride, w.host, norm_eps, y.host, rstd.host);
            CHECK_CLOSE(ref::download(y.device), y.host, ref::tolerance<T>());
            CHECK_CLOSE(ref::download(rstd.device), rstd.host, ref::tolerance<float>());
        }
    }

    TEST_CASE_TEMPLATE("rmsnorm: backward with dx in x's row stride, overwriting or accumulating dx and dw", T, float,
                       bf16) {
        Rng rng(6);
        for (NormShape s : norm_shapes)
            for (int flags = 0; flags < 4; flags++) {
                bool accumulate_dx = flags & 1, accumulate_dw = flags & 2;
                CAPTURE(s.N);
                CAPTURE(s.stride);
                CAPTURE(accumulate_dx);
                CAPTURE(accumulate_dw);
                ref::Tensor<T> x = ref::input<T>(rng, size_t(s.N) * s.stride), w = ref::input<T>(rng, s.D, 0.5, 1.5);
                ref::Tensor<T> dy = ref::input<T>(rng, size_t(s.N) * s.D);
                // rstd, the forward pass's statistic, comes from the reference here.
                std::vector<float> y(size_t(s.N) * s.D), rstd(s.N);
                ref::rmsnorm_forward(x.host, s.N, s.D, s.stride, w.host, norm_eps, y, rstd);
                DeviceBuffer<float> rstd_device = ref::upload<float>(rstd);
                DeviceBuffer<float> scratch(partial_scratch_size(s.N, s.D));
                ref::poison(scratch);
                // dx starts random, not poisoned: its columns past D belong to someone else (kv_a's k_rope).
                ref::Tensor<T> dx = ref::input<T>(rng, size_t(s.N) * s.stride);
                std::vector<float> dx_before = dx.host;
                ref::Tensor<float> dw = ref::output<float>(rng, s.D, accumulate_dw);

                rmsnorm_backward(dx.data(), dw.data(), scratch.data(), dy.data(), x.data(), s.stride, w.data(),
                                 rstd_device.data(), s.N, s.D, accumulate_dx, accumulate_dw, stream);
                ref::rmsnorm_backward(x.host, s.N, s.D, s.stride, w.host, norm_eps, dy.host, dx.host, dw.host,
                                      accumulate_dx, accumulate_dw);
                std::vector<bool> written = ref::column_mask(s.N, s.stride, 0, s.D);
                std::vector<float> got = ref::download(dx.device);
                CHECK_CLOSE(ref::where(got, written), ref::where(dx.host, written), ref::tolerance<T>());
                CHECK(ref::where(got, written, false) == ref::where(dx_before, written, false));
                CHECK_CLOSE(ref::download(dw.device), dw.host, ref::tolerance<float>());
            }
    }

    TEST_CASE_TEMPLATE("swiglu: forward and backward, at every access width", T, float, bf16) {
        Rng rng(7);
        for (SwigluShape s : swiglu_shapes) {
            CAPTURE(s.N);
            CAPTURE(s.I);
            CAPTURE(s.offset);
            // Gates over [-6, 6] reach both tails of the sigmoid.
            ref::Tensor<T> gu = ref::input<T>(rng, s.offset + size_t(s.N) * 2 * s.I, -6.0, 6.0);
            ref::Tensor<T> da = ref::input<T>(rng, s.offset + size_t(s.N) * s.I);
            ref::Tensor<T> a = ref::output<T>(rng, s.offset + size_t(s.N) * s.I, false);
            ref::Tensor<T> dgu = ref::output<T>(rng, s.offset + size_t(s.N) * 2 * s.I, false);
            swiglu_forward(a.data() + s.offset, gu.data() + s.offset, s.N, s.I, stream);
            swiglu_backward(dgu.data() + s.offset, da.data() + s.offset, gu.data() + s.offset, s.N, s.I, stream);
            std::vector<float> gu_host = after(gu.host, s.offset), da_host = after(da.host, s.offset);
            CHECK_CLOSE(after(ref::download(a.device), s.offset), ref::swiglu_forward(gu_host, s.N, s.I),
                        ref::tolerance<T>());
            CHECK_CLOSE(after(ref::download(dgu.device), s.offset), ref::swiglu_backward(gu_host, da_host, s.N, s.I),
                        ref::tolerance<T>());
        }
    }

    TEST_CASE_TEMPLATE("cross_entropy: loss and gradient; ignored targets give zeros; gradient rows sum to zero", T,
                       float, bf16) {
        const int N = 21, V = 50;
        Rng rng(8);
        // Row n is shifted by 5n: the last rows pass 88, where expf overflows unless the row's maximum is subtracted.
        std::vector<float> logits = ref::random_uniform(rng, size_t(N) * V, -4.0, 4.0);
        for (int n = 0; n < N; n++)
            for (int v = 0; v < V; v++) logits[size_t(n) * V + v] += 5.0f * n;
        std::vector<int> targets(N);
        for (int& t : targets) t = int(rng.range(0, V - 1));
        targets[2] = -1;    // padding
        targets[9] = -100;  // PyTorch's ignore_index
        float scale = 1.0f / float(std::count_if(targets.begin(), targets.end(), [](int t) { return t >= 0; }));

        DeviceBuffer<float> logits_device = ref::upload<float>(logits);
        DeviceBuffer<int> targets_device;
        targets_device.upload(targets);
        ref::Tensor<float> loss = ref::output<float>(rng, N, false);
        ref::Tensor<T> dlogits = ref::output<T>(rng, size_t(N) * V, false);
        cross_entropy(loss.data(), dlogits.data(), logits_device.data(), targets_device.data(), N, V, scale, stream);
        ref::cross_entropy(logits, targets, V, scale, loss.host, dlogits.host);

        std::vector<float> got_loss = ref::download(loss.device), got_dlogits = ref::download(dlogits.device);
        CHECK_CLOSE(got_loss, loss.host, ref::tolerance<float>());
        CHECK_CLOSE(got_dlogits, dlogits.host, ref::tolerance<T>());
        for (int n = 0; n < N; n++) {
            CAPTURE(n);
            auto row = got_dlogits.begin() + size_t(n) * V;
            if (targets[n] < 0) {
                CHECK(got_loss[n] == 0.0f);
                CHECK(std::all_of(row, row + V, [](float g) { return g == 0.0f; }));
            } else {
                // softmax and the one-hot both sum to 1; each stored element is off by T's rounding at most.
                CHECK(std::fabs(std::accumulate(row, row + V, 0.0)) <= ref::tolerance<T>() * scale);
            }
        }
    }

    TEST_CASE("sum_reduce: plain and squared sums, repeated bit for bit") {
        Rng rng(9);
        // One element; fewer than one block's threads; more than the whole grid's threads.
        for (long n : {1L, 1000L, 300001L}) {
            CAPTURE(n);
            // Positive values: no cancellation, so the FP32 sum is accurate relative to the result.
            std::vector<float> x = ref::random_uniform(rng, n, 0.0, 1.0);
            DeviceBuffer<float> x_device = ref::upload<float>(x), out(1), scratch(REDUCE_BLOCKS);
            for (bool squared : {false, true}) {
                CAPTURE(squared);
                float runs[2];
                for (float& run : runs) {
                    ref::poison(out);
                    ref::poison(scratch);
                    sum_reduce(out.data(), scratch.data(), x_device.data(), n, squared, stream);
                    run = out.download()[0];
                }
                double want = ref::sum(x, squared);
                CHECK(std::fabs(runs[0] - want) <= ref::tolerance<float>() * want);
                CHECK(std::memcmp(&runs[0], &runs[1], sizeof(float)) == 0);
            }
        }
    }

    TEST_CASE_TEMPLATE("adamw: several steps match the reference, with and without clipping", T, float, bf16) {
        const long n = 1000, n_decay = 600;
        const AdamW opt{1e-2f};
        const uint64_t seed = 42;
        Rng rng(10);
        // Gradients in [-1, 1] have a norm near 18: a limit of 1 clips them, 0 turns clipping off.
        for (float max_grad_norm : {0.0f, 1.0f}) {
            CAPTURE(max_grad_norm);
            DeviceBuffer<float> master = ref::upload<float>(ref::random_uniform(rng, n));
            DeviceBuffer<bf16> m = ref::upload<bf16>(zeros(n)), v = ref::upload<bf16>(zeros(n));
            DeviceBuffer<T> weights(n);
            for (int step = 1; step <= 4; step++) {
                CAPTURE(step);
                ref::Tensor<float> grad = ref::input<float>(rng, n);
                DeviceBuffer<float> grad_sumsq = ref::upload<float>({float(ref::sum(grad.host, true))});
                // Each step of the reference starts from the kernel's state, so that a moment the two round to
                // neighbouring BF16 values (see check_moments) cannot make the later steps drift apart.
                std::vector<float> master_want = ref::download(master), m_want = ref::download(m),
                                   v_want = ref::download(v);
                ref::poison(weights);
                adamw_update(master.data(), weights.data(), m.data(), v.data(), grad.data(), grad_sumsq.data(), n,
                             n_decay, opt, max_grad_norm, step, seed, stream);
                ref::adamw_step(grad.host, n_decay, opt, max_grad_norm, step, seed, master_want, m_want, v_want);

                // A step moves a weight by about lr; FP32 rounds a weight below 2 to within 1.2e-7.
                std::vector<float> master_got = ref::download(master);
                CHECK(ref::max_abs_error(master_got, master_want) <= 1e-4 * opt.lr);
                check_moments(ref::download(m), m_want);
                check_moments(ref::download(v), v_want);
                CHECK(ref::download(weights) == ref::round_to<T>(master_got));
            }
        }
    }

    TEST_CASE_TEMPLATE("adamw: two slices of the parameters update exactly as the whole vector does", T, float, bf16) {
        const long n = 1000, n_decay = 600, cut = 437;  // the first slice ends before the decayed values do
        const AdamW opt{1e-2f};
        Rng rng(12);
        const std::vector<float> start = ref::random_uniform(rng, n);
        ref::Tensor<float> grad = ref::input<float>(rng, n);
        DeviceBuffer<float> grad_sumsq = ref::upload<float>({float(ref::sum(grad.host, true))});
        std::vector<float> master_got[2], m_got[2], v_got[2], weights_got[2];
        for (int sliced : {0, 1}) {
            DeviceBuffer<float> master = ref::upload<float>(start);
            DeviceBuffer<bf16> m = ref::upload<bf16>(zeros(n)), v = ref::upload<bf16>(zeros(n));
            DeviceBuffer<T> weights(n);
            for (int step = 1; step <= 3; step++)
                for (const auto& [first, count] : sliced ? std::vector<std::pair<long, long>>{{0, cut}, {cut, n - cut}}
                                                         : std::vector<std::pair<long, long>>{{0, n}})
                    adamw_update(master.data() + first, weights.data() + first, m.data() + first, v.data() + first,
                                 grad.data() + first, grad_sumsq.data(), count, n_decay, opt, 1.0f, step, 5, stream,
                                 nullptr, first);
            master_got[sliced] = ref::download(master), m_got[sliced] = ref::download(m);
            v_got[sliced] = ref::download(v), weights_got[sliced] = ref::download(weights);
        }
        CHECK(master_got[1] == master_got[0]);
        CHECK(m_got[1] == m_got[0]);
        CHECK(v_got[1] == v_got[0]);
        CHECK(weights_got[1] == weights_got[0]);
    }

    TEST_CASE_TEMPLATE("adamw: with zero gradients only weight decay moves the weights, and only the first n_decay", T,
                       float, bf16) {
        const long n = 300, n_decay = 200;
        const AdamW opt{1e-2f};
        Rng rng(11);
        std::vector<float> before = ref::random_uniform(rng, n);
        DeviceBuffer<float> master = ref::upload<float>(before), grad = ref::upload<float>(zeros(n));
        DeviceBuffer<float> grad_sumsq = ref::upload<float>(zeros(1));
        DeviceBuffer<bf16> m = ref::upload<bf16>(zeros(n)), v = ref::upload<bf16>(zeros(n));
        DeviceBuffer<T> weights(n);
        ref::poison(weights);
        adamw_update(master.data(), weights.data(), m.data(), v.data(), grad.data(), grad_sumsq.data(), n, n_decay, opt,
                     1.0f, 1, 7, stream);

        std::vector<float> after = ref::download(master), decayed(before.begin(), before.begin() + n_decay);
        for (float& p : decayed) p = float(p * (1.0 - double(opt.lr) * opt.weight_decay));
        CHECK_CLOSE(std::vector<float>(after.begin(), after.begin() + n_decay), decayed, ref::tolerance<float>());
        CHECK(std::equal(after.begin() + n_decay, after.end(), before.begin() + n_decay));
        CHECK(ref::download(m) == zeros(n));
        CHECK(ref::download(v) == zeros(n));
        CHECK(ref::download(weights) == ref::round_to<T>(after));
    }
}

// The backward kernels against an independent derivation: central finite differences of the reference forward
// passes, in FP32 storage (the other cases check the kernels against the references' own backward passes).
TEST_SUITE("gpu") {
    TEST_CASE("the layers' backward kernels agree with finite differences of the forward passes") {
        Rng rng(12);
        SUBCASE("linear") {
            const int M = 3, N = 4, K = 5;
            std::vector<float> x = ref::random_uniform(rng, M * K), W = ref::random_uniform(rng, N * K);
            std::vector<float> R = ref::random_uniform(rng, M * N);  // L = sum(y * R), so dL/dy = R
            auto loss = [&](const std::vector<float>& xs, const std::vector<float>& Ws) {
                std::vector<float> y(M * N);
                ref::linear_forward(xs, Ws, M, N, K, y, false);
                return ref::dot(y, R);
            };
            DeviceBuffer<float> x_d = ref::upload<float>(x), W_d = ref::upload<float>(W), R_d = ref::upload<float>(R);
            DeviceBuffer<float> dx(M * K), dW(N * K);
            ref::poison(dx), ref::poison(dW);
            Blas blas;
            linear_backward(blas, stream, dx.data(), dW.data(), R_d.data(), x_d.data(), W_d.data(), M, N, K);
            auto loss_x = [&](const std::vector<float>& xs) { return loss(xs, W); };
            auto loss_W = [&](const std::vector<float>& Ws) { return loss(x, Ws); };
            CHECK(ref::rel_error(ref::download(dx), numerical_gradient_float(loss_x, x)) <= fd_tolerance);
            CHECK(ref::rel_error(ref::download(dW), numerical_gradient_float(loss_W, W)) <= fd_tolerance);
        }
        SUBCASE("rmsnorm on strided rows") {
            const int N = 3, D = 5, stride = 7;
            std::vector<float> x = ref::random_uniform(rng, N * stride), w = ref::random_uniform(rng, D, 0.5, 1.5);
            std::vector<float> R = ref::random_uniform(rng, N * D);
            auto loss = [&](const std::vector<float>& xs, const std::vector<float>& ws) {
                std::vector<float> y(N * D), rstd(N);
                ref::rmsnorm_forward(xs, N, D, stride, ws, norm_eps, y, rstd);
                return ref::dot(y, R);
            };
            DeviceBuffer<float> x_d = ref::upload<float>(x), w_d = ref::upload<float>(w), R_d = ref::upload<float>(R);
            DeviceBuffer<float> y(N * D), rstd(N), dx(N * stride), dw(D), scratch(partial_scratch_size(N, D));
            ref::poison(dx), ref::poison(dw), ref::poison(scratch);
            rmsnorm_forward(y.data(), rstd.data(), x_d.data(), stride, w_d.data(), N, D, float(norm_eps), stream);
            rmsnorm_backward(dx.data(), dw.data(), scratch.data(), R_d.data(), x_d.data(), stride, w_d.data(),
                             rstd.data(), N, D, false, false, stream);
            auto loss_x = [&](const std::vector<float>& xs) { return loss(xs, w); };
            auto loss_w = [&](const std::vector<float>& ws) { return loss(x, ws); };
            const std::vector<bool> written = ref::column_mask(N, stride, 0, D);
            CHECK(ref::rel_error(ref::where(ref::download(dx), written),
                                 ref::where(numerical_gradient_float(loss_x, x), written)) <= fd_tolerance);
            CHECK(ref::rel_error(ref::download(dw), numerical_gradient_float(loss_w, w)) <= fd_tolerance);
        }
        SUBCASE("swiglu") {
            const int N = 3, I = 4;
            std::vector<float> gu = ref::random_uniform(rng, N * 2 * I, -3.0, 3.0), R = ref::random_uniform(rng, N * I);
            auto loss = [&](const std::vector<float>& g) { return ref::dot(ref::swiglu_forward(g, N, I), R); };
            DeviceBuffer<float> gu_d = ref::upload<float>(gu), R_d = ref::upload<float>(R), dgu(N * 2 * I);
            ref::poison(dgu);
            swiglu_backward(dgu.data(), R_d.data(), gu_d.data(), N, I, stream);
            CHECK(ref::rel_error(ref::download(dgu), numerical_gradient_float(loss, gu)) <= fd_tolerance);
        }
        SUBCASE("cross_entropy with an ignored target") {
            const int V = 6;
            const double scale = 1.0 / 3.0;
            std::vector<int> targets = {4, -1, 0, 5};
            const int N = int(targets.size());
            std::vector<float> logits = ref::random_uniform(rng, size_t(N) * V, -3.0, 3.0);
            auto loss = [&](const std::vector<float>& l) {
                std::vector<float> loss_n(N), d(l.size());
                ref::cross_entropy(l, targets, V, scale, loss_n, d);
                return scale * ref::sum(loss_n, false);
            };
            DeviceBuffer<float> logits_d = ref::upload<float>(logits), loss_n(N), dlogits(size_t(N) * V);
            DeviceBuffer<int> targets_d;
            targets_d.upload(targets);
            ref::poison(loss_n), ref::poison(dlogits);
            cross_entropy(loss_n.data(), dlogits.data(), logits_d.data(), targets_d.data(), N, V, float(scale), stream);
            CHECK(ref::rel_error(ref::download(dlogits), numerical_gradient_float(loss, logits)) <= fd_tolerance);
        }
    }

    TEST_CASE("add_into: y += x elementwise, in FP32 and in integers") {
        const long n = 1000;  // four blocks, the last in part
        Rng rng(13);
        std::vector<float> y = ref::random_uniform(rng, n), x = ref::random_uniform(rng, n), want_f(n);
        std::vector<int> yi(n), xi(n), want_i(n);
        for (long i = 0; i < n; i++) {
            yi[i] = int(rng.range(-50, 50)), xi[i] = int(rng.range(-50, 50));
            want_f[i] = y[i] + x[i], want_i[i] = yi[i] + xi[i];
        }
        DeviceBuffer<float> y_d, x_d;
        DeviceBuffer<int> yi_d, xi_d;
        y_d.upload(y), x_d.upload(x), yi_d.upload(yi), xi_d.upload(xi);
        add_into(y_d.data(), x_d.data(), n, stream);
        add_into(yi_d.data(), xi_d.data(), n, stream);
        CHECK(y_d.download() == want_f);  // one rounding each, the same as the host's
        CHECK(yi_d.download() == want_i);
    }
}
