// Exercise 2: GRPO's group-relative advantages, and Dr. GRPO's unscaled form.
// This file replaces group_advantages in grpo.cuh (GroupAdvantages is defined just above it). Check it with
// `make exercise 2`.

// rewards: n_groups * G values, group by group (the G responses to one prompt side by side). Each response's
// advantage is its reward minus its group's mean, divided by the group's standard deviation + eps where
// scale_by_std (GRPO), not divided where not (Dr. GRPO). Count the groups whose rewards are all equal. Rewards that
// are not whole groups (or G < 1) are refused with std::invalid_argument.
inline GroupAdvantages group_advantages(const std::vector<float>& rewards, int G, bool scale_by_std,
                                        float eps = 1e-4f) {
    GroupAdvantages out;
    out.advantage.assign(rewards.size(), 0.0f);
    // your code here
    return out;
}
