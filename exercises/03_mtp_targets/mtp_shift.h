// Exercise 3: what the k-th multi-token prediction module sees and predicts.
// This file replaces mtp_shift in mtp.cuh. Check it with `make exercise 3`.

// Rows [B, T] of inputs t_0..t_{T-1} and their targets t_1..t_T (a negative target has no loss). Module k, at
// position i, embeds the token t_{i+k} and predicts t_{i+k+1}. Fill tokens and shifted, both [B, T]; the last k
// positions of each row have no target (-1) and embed token 0.
inline void mtp_shift(const std::vector<int>& inputs, const std::vector<int>& targets, int B, int T, int k,
                      std::vector<int>& tokens, std::vector<int>& shifted) {
    tokens.assign(size_t(B) * T, 0), shifted.assign(size_t(B) * T, -1);
    // your code here
}
