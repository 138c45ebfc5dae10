// Exercise 5: GRPO's clipped objective and its KL term, at one token.
// This file replaces grpo_token_objective in grpo.cuh (TokenObjective, GrpoConfig and MAX_LOG_RATIO are defined
// above it). The GPU kernel grpo_loss_kernel calls it for every response token, so it must run on the host and on
// the GPU (HD). Check it with `make exercise 5`.

// logp, logp_old, logp_ref: the token's log-probability under pi_theta, pi_old and pi_ref; A: its advantage.
// Fill every field of TokenObjective (grpo.cuh says what each holds): rho = pi_theta / pi_old; J the min of rho A and
// clip(rho, 1 - eps_low, 1 + eps_high) A, minus beta k3; dJ_dlogp its derivative with respect to logp.
HD TokenObjective grpo_token_objective(float logp, float logp_old, float logp_ref, float A, const GrpoConfig& cfg) {
    TokenObjective t{0.0f, 0.0f, 0.0f, false};
    // your code here
    return t;
}
