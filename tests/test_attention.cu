// Tests of attention.cuh: the core of MLA against the CPU reference of tests/reference.h, in FP32 and BF16 storage.
// The forward pass is compared directly, with the tensors it saves; the backward pass against finite differences of
// the reference, so that no hand-derived gradient stands between the kernels and the definition of attention.
#include <algorithm>

#include "reference.h"

namespace {

using ref::stream;
using Vec = std::vector<double>;

// Every dimension differs from the others, so a stride taken from the wrong one shows. The second shape's softmax
// rows are longer than a warp's 32 lanes. The layout kernels move 2 values at a time in the first two, 16 bytes in
// the third, and single values in the fourth (odd widths; a rope value's partner is read beside it); 9 and 5 tokens
// leave the last block of MLA_TOKENS part-empty.
const MlaDims shapes[] = {
    {2, 7, 3, 16, 8, 12, 10, 10000.0f},
    {2, 33, 2, 8, 4, 16, 14, 10000.0f},
    {1, 9, 2, 16, 8, 32, 24, 10000.0f},
    {1, 5, 3, 7, 2, 9, 11, 10000.0f},
};

// The BF16 gradients go through more roundings than the forward pass: P, dS, dQ/dK/dV, and the rotated rope rows.
template <typename T>
constexpr double gradient_tolerance() {
    return 2.0 * ref::tolerance<T>();
}

size_t q_size(const MlaDims& m) { return size_t(m.N()) * m.H * m.d_qk(); }
size_t kva_size(const MlaDims& m) { return size_t(m.N()) * (m.d_c + m.d_rope); }
size_t kvb_size(const MlaDims& m) { return size_t(m.N()) * m.H * (m.d_nope + m.d_v); }
size_t o_size(const MlaDims& m) { return size_t(m.N()) * m.H * m.d_v; }

// Random projections, rounded to T. Values in [-2, 2] make scores of about unit spread, so that the softmax rows are
// far from uniform.
template <typename T>
struct MlaInputs {
    ref::Tensor<T> q, kva, kvb;
    MlaInputs(const MlaDims& m, Rng& rng)
        : q(ref::input<T>(rng, q_size(m), -2.0, 2.0)),
          kva(ref::input<T>(rng, kva_size(m), -2.0, 2.0)),
          kvb(ref::input<T>(rng, kvb_size(m), -2.0, 2.0)) {}
};

// What attention.cuh saves for the backward pass and reuses as scratch, all poisoned.
template <typename T>
struct MlaBuffers {
    DeviceBuffer<T> Q, K, V, P, O, dS, dQ, dK, dV;
    DeviceBuffer<float> S;

    explicit MlaBuffers(const MlaDims& m) {
        size_t rows = size_t(m.heads()) * m.T;
        for (DeviceBuffer<T>* b : {&Q, &K, &dQ, &dK}) b->resize(rows * m.d_qk());
        for (DeviceBuffer<T>* b : {&V, &O, &dV}) b->resize(rows * m.d_v);
        for (DeviceBuffer<T>* b : {&P, &dS}) b->resize(rows * m.T);
        S.resize(rows * m.T);
        for (DeviceBuffer<T>* b : {&Q, &K, &V, &P, &O, &dS, &dQ, &dK, &dV}) ref::poison(*b);
        ref::poison(S);
    }
    MlaSaved<T> saved() const { return {Q.data(), K.data(), V.data(), P.data()}; }
    MlaScratch<T> scratch() const { return {S.data(), O.data(), dS.data(), dQ.data(), dK.data(), dV.data()}; }
};

// Packed Q or K against the reference: the nope columns are copies (exact), the rope columns rotated.
void check_packed(const std::vector<float>& got, const Vec& want, const MlaDims& m, double tol) {
    std::vector<bool> rope = ref::column_mask(int(m.heads() * m.T), m.d_qk(), m.d_nope, m.d_qk());
    CHECK(ref::max_abs_error(ref::where(got, rope, false), ref::where(want, rope, false)) == 0.0);
    CHECK_CLOSE(ref::where(got, rope), ref::where(want, rope), tol);
}

// Each row i of P [B*H*T, T] is a distribution over the causal prefix: exact zeros past column i, a sum of 1.
void check_causal(const std::vector<float>& P, const MlaDims& m, double tol) {
    long bad_sums = 0, nonzero_above = 0;
    for (long r = 0; r < m.heads() * m.T; r++) {
        int i = int(r % m.T);
        double sum = 0.0;
        for (int j = 0; j < m.T; j++) {
            float p = P[r * m.T + j];
            if (j <= i)
                sum += p;
            else
                nonzero_above += p != 0.0f;
        }
        bad_sums += !(std::fabs(sum - 1.0) <= tol);
    }
    CHECK(bad_sums == 0);
    CHECK(nonzero_above == 0);
}

struct Gradients {
    Vec dq, dkva, dkvb;
};

Vec rows_of(const Vec& x, long first, long count, long width) {
    return Vec(x.begin() + first * width, x.begin() + (first + count) * width);
}

// dL/dq, dL/dkva, dL/dkvb of L = sum(o * R), by central differences through the reference. Attention never mixes
// sequences, so each sequence is differentiated on its own, as a batch of one: half the work of the whole batch.
Gradients finite_difference_gradients(const MlaDims& m, const Vec& q, const Vec& kva, const Vec& kvb, const Vec& R) {
    MlaDims one = m;
    one.B = 1;
    long q_width = long(m.H) * m.d_qk(), kva_width = m.d_c + m.d_rope, kvb_width = long(m.H) * (m.d_nope + m.d_v);
    Gradients g;
    for (int b = 0; b < m.B; b++) {
        long first = long(b) * m.T;
        Vec qb = rows_of(q, first, m.T, q_width), kvab = rows_of(kva, first, m.T, kva_width);
        Vec kvbb = rows_of(kvb, first, m.T, kvb_width), Rb = rows_of(R, first, m.T, long(m.H) * m.d_v);
        auto loss = [&](const Vec& qx, const Vec& kvax, const Vec& kvbx) {
            return ref::dot(ref::mla_attention_forward(one, qx, kvax, kvbx), Rb);
        };
        Vec dq = ref::numerical_gradient([&](const Vec& x) { return loss(x, kvab, kvbb); }, qb);
        Vec dkva = ref::numerical_gradient([&](const Vec& x) { return loss(qb, x, kvbb); }, kvab);
        Vec dkvb = ref::numerical_gradient([&](const Vec& x) { return loss(qb, kvab, x); }, kvbb);
        // Sequence b's rows follow sequence b - 1's.
        g.dq.insert(g.dq.end(), dq.begin(), dq.end());
        g.dkva.insert(g.dkva.end(), dkva.begin(), dkva.end());
        g.dkvb.insert(g.dkvb.end(), dkvb.begin(), dkvb.end());
    }
    return g;
}

// sqrt(sum_i (a_i b_i)^2) is the size of the rounding error of <a, b> when every term carries its own independent
// rounding (a random walk); the sum of |a_i b_i| would be a bound loose enough to hide a wrong layout in BF16.
double sum_of_squared_products(const std::vector<float>& a, const std::vector<float>& b) {
    double s = 0.0;
    for (size_t i = 0; i < a.size(); i++) s += (double(a[i]) * b[i]) * (double(a[i]) * b[i]);
    return s;
}

}  // namespace

TEST_SUITE("gpu") {
    // With rows of 300 tokens (a lane holds 16 of a row's scores) and of the longest the softmax takes.
    TEST_CASE_TEMPLATE("mla attention: forward matches the reference, RoPE included; P is causal, rows sum to 1", T,
                       float, bf16) {
        Rng rng(20);
        std::vector<MlaDims> forward_shapes(std::begin(shapes), std::end(shapes));
        forward_shapes.push_back({1, 300, 1, 8, 4, 8, 8, 10000.0f});
        forward_shapes.push_back({1, SOFTMAX_MAX_T, 1, 4, 2, 4, 4, 10000.0f});
        for (const MlaDims& m : forward_shapes) {
            CAPTURE(m.T);
            MlaInputs<T> in(m, rng);
            MlaBuffers<T> buf(m);
            ref::Tensor<T> o = ref::output<T>(rng, o_size(m), false);
            Blas blas;
            mla_attention_forward(blas, stream, m, o.data(), buf.saved(), buf.scratch(), in.q.data(), in.kva.data(),
                                  in.kvb.data());

            Vec q = ref::to_double(in.q.host), kva = ref::to_double(in.kva.host), kvb = ref::to_double(in.kvb.host);
            ref::MlaHeads heads = ref::mla_pack(m, q, kva, kvb);
            Vec P;
            Vec o_want = ref::mla_attention_forward(m, q, kva, kvb, &P);
            check_packed(ref::download(buf.Q), heads.Q, m, ref::tolerance<T>());
            check_packed(ref::download(buf.K), heads.K, m, ref::tolerance<T>());
            CHECK(ref::max_abs_error(ref::download(buf.V), heads.V) == 0.0);
            CHECK_CLOSE(ref::download(o.device), o_want, ref::tolerance<T>());
            std::vector<float> P_got = ref::download(buf.P);
            CHECK_CLOSE(P_got, P, ref::tolerance<T>());
            check_causal(P_got, m, ref::tolerance<T>());
        }
    }

    TEST_CASE("mla attention: rows longer than the softmax takes are refused") {
        const MlaDims m{1, SOFTMAX_MAX_T + 1, 1, 4, 2, 4, 4, 10000.0f};
        Rng rng(21);
        MlaInputs<float> in(m, rng);
        MlaBuffers<float> buf(m);
        DeviceBuffer<float> o(o_size(m));
        Blas blas;
        CHECK_THROWS_AS(mla_attention_forward(blas, stream, m, o.data(), buf.saved(), buf.scratch(), in.q.data(),
                                              in.kva.data(), in.kvb.data()),
                        std::invalid_argument);
    }

    // With rows of 70 tokens too: a lane holds 4 of a row's scores.
    TEST_CASE_TEMPLATE("mla attention: backward matches finite differences of the reference; c_kv columns untouched", T,
                       float, bf16) {
        Rng rng(21);
        std::vector<MlaDims> backward_shapes(std::begin(shapes), std::end(shapes));
        backward_shapes.push_back({1, 70, 1, 4, 2, 4, 4, 10000.0f});
        for (const MlaDims& m : backward_shapes) {
            CAPTURE(m.T);
            MlaInputs<T> in(m, rng);
            ref::Tensor<T> R = ref::input<T>(rng, o_size(m));  // L = sum(o * R), so dL/do = R
            MlaBuffers<T> buf(m);
            ref::Tensor<T> o = ref::output<T>(rng, o_size(m), false);
            ref::Tensor<T> dq = ref::output<T>(rng, q_size(m), false), dkva = ref::output<T>(rng, kva_size(m), false);
            ref::Tensor<T> dkvb = ref::output<T>(rng, kvb_size(m), false);
            Blas blas;
            mla_attention_forward(blas, stream, m, o.data(), buf.saved(), buf.scratch(), in.q.data(), in.kva.data(),
                                  in.kvb.data());
            mla_attention_backward(blas, stream, m, dq.data(), dkva.data(), dkvb.data(), buf.saved(), buf.scratch(),
                                   R.data());

            Gradients want = finite_difference_gradients(m, ref::to_double(in.q.host), ref::to_double(in.kva.host),
                                                         ref::to_double(in.kvb.host), ref::to_double(R.host));
            CHECK_CLOSE(ref::download(dq.device), want.dq, gradient_tolerance<T>());
            CHECK_CLOSE(ref::download(dkvb.device), want.dkvb, gradient_tolerance<T>());
            std::vector<bool> k_rope = ref::column_mask(m.N(), m.d_c + m.d_rope, m.d_c, m.d_c + m.d_rope);
            std::vector<float> dkva_got = ref::download(dkva.device);
            CHECK_CLOSE(ref::where(dkva_got, k_rope), ref::where(want.dkva, k_rope), gradient_tolerance<T>());
            // The c_kv columns of dkva come from kv_a's RMSNorm backward: they must still hold the poison.
            std::vector<float> c_kv = ref::where(dkva_got, k_rope, false);
            CHECK(std::all_of(c_kv.begin(), c_kv.end(), [](float x) { return std::isnan(x); }));
        }
    }

    TEST_CASE_TEMPLATE("mla attention: the unpack kernels are the adjoint of the pack kernel", T, float, bf16) {
        Rng rng(22);
        for (const MlaDims& m : shapes) {
            CAPTURE(m.T);
            MlaInputs<T> x(m, rng);
            MlaBuffers<T> packed(m);
            size_t rows = size_t(m.heads()) * m.T;
            ref::Tensor<T> yQ = ref::input<T>(rng, rows * m.d_qk()), yK = ref::input<T>(rng, rows * m.d_qk());
            ref::Tensor<T> yV = ref::input<T>(rng, rows * m.d_v);
            ref::Tensor<T> dq = ref::output<T>(rng, q_size(m), false), dkvb = ref::output<T>(rng, kvb_size(m), false);
            // The pack never reads kva's c_kv columns, so their part of the adjoint is zero; the unpack leaves them.
            DeviceBuffer<T> dkva(kva_size(m));
            CUDA_CHECK(cudaMemset(dkva.data(), 0, dkva.bytes()));

            mla_pack(packed.Q.data(), packed.K.data(), packed.V.data(), x.q.data(), x.kva.data(), x.kvb.data(), m,
                     stream);
            mla_unpack(dq.data(), dkva.data(), dkvb.data(), yQ.data(), yK.data(), yV.data(), m, stream);
            CUDA_CHECK(cudaStreamSynchronize(stream));

            std::vector<float> Q = ref::download(packed.Q), K = ref::download(packed.K), V = ref::download(packed.V);
            std::vector<float> dq_got = ref::download(dq.device), dkva_got = ref::download(dkva);
            std::vector<float> dkvb_got = ref::download(dkvb.device);
            double lhs = ref::dot(Q, yQ.host) + ref::dot(K, yK.host) + ref::dot(V, yV.host);
            double rhs = ref::dot(x.q.host, dq_got) + ref::dot(x.kva.host, dkva_got) + ref::dot(x.kvb.host, dkvb_got);
            double scale = std::sqrt(sum_of_squared_products(Q, yQ.host) + sum_of_squared_products(K, yK.host) +
                                     sum_of_squared_products(V, yV.host));
            CHECK(std::fabs(lhs - rhs) <= ref::tolerance<T>() * scale);
        }
    }

    TEST_CASE("mla attention: equal scores average the values of the causal prefix, reference and kernel alike") {
        const MlaDims m = shapes[0];
        Rng rng(24);
        // q = 0 makes every score 0, so P_tj = 1 / (t + 1) for j <= t and o_t is the mean of v_0 ... v_t: a
        // result worked out by hand, which neither the kernel nor the reference computes this way.
        MlaInputs<float> in(m, rng);
        in.q.host.assign(q_size(m), 0.0f);
        in.q.device = ref::upload<float>(in.q.host);
        const Vec kvb = ref::to_double(in.kvb.host);
        Vec o_want(o_size(m)), P_want(size_t(m.heads()) * m.T * m.T, 0.0);
        const int kvb_width = m.H * (m.d_nope + m.d_v);
        for (int b = 0; b < m.B; b++)
            for (int h = 0; h < m.H; h++)
                for (int t = 0; t < m.T; t++) {
                    long row = (long(b) * m.H + h) * m.T + t;
                    for (int j = 0; j <= t; j++) P_want[row * m.T + j] = 1.0 / (t + 1);
                    for (int e = 0; e < m.d_v; e++) {
                        double sum = 0.0;
                        for (int j = 0; j <= t; j++)
                            sum += kvb[(long(b) * m.T + j) * kvb_width + h * (m.d_nope + m.d_v) + m.d_nope + e];
                        o_want[((long(b) * m.T + t) * m.H + h) * m.d_v + e] = sum / (t + 1);
                    }
                }
        Vec P;
        const Vec o = ref::mla_attention_forward(m, ref::to_double(in.q.host), ref::to_double(in.kva.host), kvb, &P);
        CHECK(ref::max_abs_error(P, P_want) <= 1e-12);
        CHECK(ref::max_abs_error(o, o_want) <= 1e-12);

        MlaBuffers<float> buf(m);
        ref::Tensor<float> o_gpu = ref::output<float>(rng, o_size(m), false);
        Blas blas;
        mla_attention_forward(blas, stream, m, o_gpu.data(), buf.saved(), buf.scratch(), in.q.data(), in.kva.data(),
                              in.kvb.data());
        CHECK_CLOSE(ref::download(buf.P), P_want, ref::tolerance<float>());
        CHECK_CLOSE(ref::download(o_gpu.device), o_want, ref::tolerance<float>());
    }
}

TEST_SUITE("reference") {
    TEST_CASE("rope_rotate: matches the reference RoPE, and its inverse undoes it") {
        const int d_rope = 8;
        const float theta = 10000.0f;
        Rng rng(23);
        for (int pos : {0, 1, 5, 39}) {
            CAPTURE(pos);
            std::vector<float> x = ref::random_uniform(rng, d_rope), rotated = x, restored;
            for (int i = 0; i < d_rope / 2; i++)
                rope_rotate(rotated[2 * i], rotated[2 * i + 1], pos, i, d_rope, theta, false);
            restored = rotated;
            for (int i = 0; i < d_rope / 2; i++)
                rope_rotate(restored[2 * i], restored[2 * i + 1], pos, i, d_rope, theta, true);
            Vec want = ref::to_double(x);
            ref::rope(want.data(), d_rope, pos, theta);
            CHECK_CLOSE(rotated, want, ref::tolerance<float>());
            CHECK_CLOSE(restored, x, ref::tolerance<float>());
        }
    }

}
